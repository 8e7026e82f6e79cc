using System.Runtime.InteropServices;
using SparseAttention.Kernels.Fused;
using SparseAttention.Patterns;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// Fused block-sparse attention for float32 CPU tensors: C# SIMD kernels over raw memory, wrapped
/// as a TorchSharp autograd function. The forward runs a flash-style online softmax per query block
/// (threads over batch × head × query block); the backward is one key-major pass (FlashAttention-2
/// style, threads over batch × head, each head split into runs of key blocks when batch × heads is
/// below the processor count). Results do not depend on the thread count.
/// </summary>
public static class FusedBlockSparseAttention
{
    /// <summary>True when the fused kernels can run on tensors like <paramref name="q"/> (float32 on CPU).</summary>
    public static bool Supports(Tensor q) => q.device_type == DeviceType.CPU && q.dtype == ScalarType.Float32;

    /// <summary>Threads the fused kernels use when a call does not say; default: all processors.</summary>
    public static int DefaultThreads { get; set; } = Environment.ProcessorCount;

    /// <inheritdoc cref="BlockSparseOpsAttention.Attention"/>
    /// <param name="threads">Worker threads (results do not depend on it); default <see cref="DefaultThreads"/>.</param>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask = null,
        double? scale = null, int? threads = null) => Attention(q, k, v, mask, keyMask, scale, threads, backwardChunks: 0);

    /// <summary><see cref="Attention(Tensor, Tensor, Tensor, BlockMask, Tensor?, double?, int?)"/> with the number of
    /// backward tasks per (batch, head) fixed (0 = automatic), so tests can reach the dQ-partials path on any machine.</summary>
    internal static Tensor Attention(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask, double? scale, int? threads,
        int backwardChunks)
    {
        BlockSparseOpsAttention.CheckArguments(q, k, v, mask, keyMask);
        Check.That(Supports(q), nameof(q), $"the fused kernels need float32 CPU tensors, got {q.dtype} on {q.device}.");
        if (threads is int t) Check.Positive(t, nameof(threads));
        double s = scale ?? 1.0 / Math.Sqrt(q.shape[3]);
        return BlockSparseFunction.apply(q, k, v, keyMask, new Settings(mask, (float)s, threads ?? DefaultThreads, backwardChunks));
    }

    internal sealed record Settings(BlockMask Mask, float Scale, int Threads, int BackwardChunks);

    [DllImport("LibTorchSharp")]
    private static extern nint THSTensor_data(nint tensor);

    /// <summary>Address of the tensor's first element (storage offset included), for any size: read from
    /// libtorch directly, not through <c>Tensor.bytes</c>, whose span length is an int (it threw at 2 GiB).</summary>
    internal static nint Pointer(Tensor t)
    {
        if (t.numel() == 0) return 0;
        nint p = THSTensor_data(t.Handle);
        if (p == 0) throw new InvalidOperationException($"libtorch returned no data pointer for a {t.dtype} tensor of shape ({string.Join(", ", t.shape)}).");
        return p;
    }

    private sealed class BlockSparseFunction : autograd.SingleTensorFunction<BlockSparseFunction>
    {
        public override string Name => "FusedBlockSparseAttention";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var (q, k, v) = (((Tensor)vars[0]).contiguous(), ((Tensor)vars[1]).contiguous(), ((Tensor)vars[2]).contiguous());
            var keyMask = vars[3] as Tensor;
            var settings = (Settings)vars[4];
            long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dimV = v.shape[3];
            Tensor? keyBias = null;
            if (keyMask is not null)
            {
                var drop = keyMask.logical_not();
                k = k.masked_fill(drop.view(batch, 1, seqLen, 1), 0);                      // NaN in padding must not leak via 0·x
                v = v.masked_fill(drop.view(batch, 1, seqLen, 1), 0);
                keyBias = zeros(batch, seqLen).masked_fill(drop, float.NegativeInfinity);  // (B, T)
            }
            var output = empty(new[] { batch, heads, seqLen, dimV });                      // (B, H, T, Dv)
            var lse = empty(new[] { batch, heads, seqLen });                               // (B, H, T)
            var args = Arguments(q, settings);
            args.K = Pointer(k); args.V = Pointer(v);
            args.KeyBias = keyBias is null ? 0 : Pointer(keyBias);
            args.O = Pointer(output); args.Lse = Pointer(lse);
            args.DimV = (int)dimV;
            BlockSparseKernel.Forward(FusedLayout.For(settings.Mask), args);
            GC.KeepAlive(q); GC.KeepAlive(k); GC.KeepAlive(v); GC.KeepAlive(keyBias);  // read through raw pointers above
            ctx.save_for_backward([q, k, v, output, lse, keyBias ?? empty(0)]);
            ctx.save_data("settings", settings);
            return output;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var saved = ctx.get_saved_variables();
            var (q, k, v, output, lse, keyBias) = (saved[0], saved[1], saved[2], saved[3], saved[4], saved[5]);
            var settings = (Settings)ctx.get_data("settings");
            var dO = gradOutput.contiguous();
            var (dq, dk, dv) = (empty_like(q), empty_like(k), empty_like(v));
            var args = Arguments(q, settings);
            args.DimV = (int)v.shape[3];
            args.K = Pointer(k); args.V = Pointer(v);
            args.KeyBias = keyBias.numel() == 0 ? 0 : Pointer(keyBias);
            args.Lse = Pointer(lse); args.DO = Pointer(dO); args.O = Pointer(output);
            args.DQ = Pointer(dq); args.DK = Pointer(dk); args.DV = Pointer(dv);
            BlockSparseKernel.Backward(FusedLayout.For(settings.Mask), args);
            // The kernel only saw raw pointers: keep every tensor it read or wrote reachable until it is
            // done, or the GC may finalize a wrapper (and free its memory) mid-kernel in optimised builds.
            GC.KeepAlive(saved); GC.KeepAlive(dO); GC.KeepAlive(dq); GC.KeepAlive(dk); GC.KeepAlive(dv);
            return [dq, dk, dv, null!, null!];
        }

        private static KernelArgs Arguments(Tensor q, Settings settings) => new()
        {
            Batch = (int)q.shape[0], Heads = (int)q.shape[1], SeqLen = (int)q.shape[2], Dim = (int)q.shape[3],
            Threads = settings.Threads, Scale = settings.Scale, Q = Pointer(q), Chunks = settings.BackwardChunks,
        };
    }
}
