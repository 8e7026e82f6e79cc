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

    /// <summary>True when <see cref="AttentionKernel.Auto"/> takes the fused kernels for tensors like <paramref name="q"/>:
    /// <see cref="Supports"/> and a hardware-accelerated vector width (<see cref="SimdWidth.Vectorised"/>).</summary>
    internal static bool PreferredFor(Tensor q) => SimdWidth.Vectorised && Supports(q);

    /// <summary>Threads the fused kernels use when a call does not say; default: all processors. A process-wide setting
    /// (the CLI's <c>--threads</c> sets it with libtorch's own thread count); results never depend on it.</summary>
    public static int DefaultThreads
    {
        get => defaultThreads;
        set { Check.Positive(value, nameof(DefaultThreads)); defaultThreads = value; }
    }

    private static int defaultThreads = Environment.ProcessorCount;

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

    /// <summary>Keys and values with padding keys zeroed (NaN there must not leak via 0·x) and the additive key
    /// bias (B, T): 0 = real key, −∞ = padding; unchanged and null without a key mask.</summary>
    internal static (Tensor K, Tensor V, Tensor? KeyBias) MaskKeys(Tensor k, Tensor v, Tensor? keyMask)
    {
        if (keyMask is null) return (k, v, null);
        long batch = k.shape[0], seqLen = k.shape[2];
        var drop = keyMask.logical_not();
        var dropRows = drop.view(batch, 1, seqLen, 1);                                     // (B, 1, T, 1)
        return (k.masked_fill(dropRows, 0), v.masked_fill(dropRows, 0),
                zeros(batch, seqLen).masked_fill(drop, float.NegativeInfinity));           // (B, T)
    }

    /// <summary>The forward kernel on contiguous float32 tensors: output (B, H, T, Dv) and the row
    /// log-sum-exp (B, H, T), +∞ for a row with no allowed key (its output is zero).</summary>
    internal static (Tensor Output, Tensor Lse) ForwardKernel(BlockMask mask, Tensor q, Tensor k, Tensor v, Tensor? keyBias,
        float scale, int threads)
    {
        long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dimV = v.shape[3];
        var output = empty(new[] { batch, heads, seqLen, dimV });                          // (B, H, T, Dv)
        var lse = empty(new[] { batch, heads, seqLen });                                   // (B, H, T)
        var args = Arguments(q, k, v, keyBias, scale, threads, chunks: 0);
        args.O = Pointer(output); args.Lse = Pointer(lse);
        BlockSparseKernel.Forward(FusedLayout.For(mask), args);
        GC.KeepAlive(q); GC.KeepAlive(k); GC.KeepAlive(v); GC.KeepAlive(keyBias);  // read through raw pointers above
        return (output, lse);
    }

    /// <summary>The backward kernel: gradients of q, k, v given dO (B, H, T, Dv), and the output (B, H, T, Dv) and
    /// row log-sum-exp (B, H, T) of the softmax the keys of <paramref name="mask"/> take part in. Passing the output
    /// and log-sum-exp of a larger softmax (this mask's keys plus others) gives this mask's share of its gradients.</summary>
    /// <param name="chunks">Backward tasks per (batch, head); 0 = automatic.</param>
    /// <param name="delta">Optional Δ (B, H, T) to use instead of rowsum(dO ∘ output) — e.g. lowered by a gradient of the
    /// log-sum-exp, which adds d lseᵢ·Pᵢⱼ to dSᵢⱼ; <paramref name="output"/> is then not read.</param>
    internal static (Tensor Dq, Tensor Dk, Tensor Dv) BackwardKernel(BlockMask mask, Tensor q, Tensor k, Tensor v, Tensor? keyBias,
        Tensor output, Tensor lse, Tensor dO, float scale, int threads, int chunks = 0, Tensor? delta = null)
    {
        var (dq, dk, dv) = (empty_like(q), empty_like(k), empty_like(v));
        var args = Arguments(q, k, v, keyBias, scale, threads, chunks);
        args.Lse = Pointer(lse); args.DO = Pointer(dO); args.O = Pointer(output);
        if (delta is not null) args.Delta = Pointer(delta);
        args.DQ = Pointer(dq); args.DK = Pointer(dk); args.DV = Pointer(dv);
        BlockSparseKernel.Backward(FusedLayout.For(mask), args);
        // The kernel only saw raw pointers: keep every tensor it read or wrote reachable until it is
        // done, or the GC may finalize a wrapper (and free its memory) mid-kernel in optimised builds.
        GC.KeepAlive(q); GC.KeepAlive(k); GC.KeepAlive(v); GC.KeepAlive(keyBias);
        GC.KeepAlive(output); GC.KeepAlive(lse); GC.KeepAlive(dO); GC.KeepAlive(delta);
        return (dq, dk, dv);
    }

    private static KernelArgs Arguments(Tensor q, Tensor k, Tensor v, Tensor? keyBias, float scale, int threads, int chunks) => new()
    {
        Batch = (int)q.shape[0], Heads = (int)q.shape[1], SeqLen = (int)q.shape[2], Dim = (int)q.shape[3], DimV = (int)v.shape[3],
        Threads = threads, Scale = scale, Q = Pointer(q), K = Pointer(k), V = Pointer(v), KeyBias = keyBias is null ? 0 : Pointer(keyBias),
        Chunks = chunks,
    };

    private sealed class BlockSparseFunction : autograd.SingleTensorFunction<BlockSparseFunction>
    {
        public override string Name => "FusedBlockSparseAttention";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var q = ((Tensor)vars[0]).contiguous();
            var (k, v, keyBias) = MaskKeys(((Tensor)vars[1]).contiguous(), ((Tensor)vars[2]).contiguous(), vars[3] as Tensor);
            var settings = (Settings)vars[4];
            var (output, lse) = ForwardKernel(settings.Mask, q, k, v, keyBias, settings.Scale, settings.Threads);
            ctx.save_for_backward([q, k, v, output, lse, keyBias ?? empty(0)]);
            ctx.save_data("settings", settings);
            return output;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var saved = ctx.get_saved_variables();
            var (q, k, v, output, lse, keyBias) = (saved[0], saved[1], saved[2], saved[3], saved[4], saved[5]);
            var settings = (Settings)ctx.get_data("settings");
            var (dq, dk, dv) = BackwardKernel(settings.Mask, q, k, v, keyBias.numel() == 0 ? null : keyBias, output, lse,
                gradOutput.contiguous(), settings.Scale, settings.Threads, settings.BackwardChunks);
            return [dq, dk, dv, null!, null!];
        }
    }
}
