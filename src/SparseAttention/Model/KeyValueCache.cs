using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// Keys and values of one head group kept for incremental decoding: a ring of <see cref="Capacity"/> positions per
/// batch row, position p stored in slot p mod Capacity. Groups whose queries reach back a bounded distance R keep
/// R + 1 slots; the others keep the whole context (Capacity = MaxSeqLen, so slot = position). Allocated once; every
/// write goes in place, so memory does not grow with the number of decoded tokens.
/// </summary>
public sealed class KeyValueCache : IDisposable
{
    private readonly Tensor keys;     // (B, Capacity, H, Dk)
    private readonly Tensor values;   // (B, Capacity, H, Dv)

    /// <param name="batch">Rows B.</param>
    /// <param name="heads">Heads H of the group.</param>
    /// <param name="capacity">Positions kept per row.</param>
    /// <param name="dimKey">Key width Dk.</param>
    /// <param name="dimValue">Value width Dv.</param>
    /// <param name="dtype">Element type.</param>
    /// <param name="device">Device.</param>
    public KeyValueCache(long batch, int heads, int capacity, long dimKey, long dimValue, ScalarType dtype, Device device)
    {
        Check.That(batch > 0, nameof(batch), $"must be > 0, got {batch}.");
        Check.Positive(heads, nameof(heads));
        Check.Positive(capacity, nameof(capacity));
        Batch = batch;
        Heads = heads;
        Capacity = capacity;
        keys = zeros(new long[] { batch, capacity, heads, dimKey }, dtype: dtype, device: device).DetachFromDisposeScope();
        values = zeros(new long[] { batch, capacity, heads, dimValue }, dtype: dtype, device: device).DetachFromDisposeScope();
    }

    public long Batch { get; }
    public int Heads { get; }
    public int Capacity { get; }

    /// <summary>(B, Capacity, H, Dk), slot-major; read by <see cref="Kernels.DecodeAttention"/>.</summary>
    public Tensor Keys => keys;
    /// <summary>(B, Capacity, H, Dv).</summary>
    public Tensor Values => values;

    /// <summary>The slot holding position <paramref name="position"/>.</summary>
    public int Slot(int position) => position % Capacity;

    /// <summary>Stores one new token per row.</summary>
    /// <param name="k">(B, H, 1, Dk).</param>
    /// <param name="v">(B, H, 1, Dv).</param>
    /// <param name="positions">Position of the new token in each row.</param>
    public void Write(Tensor k, Tensor v, int[] positions)
    {
        using var scope = NewDisposeScope();
        var rows = new long[Batch];
        for (int b = 0; b < Batch; b++) rows[b] = b * Capacity + Slot(positions[b]);
        var index = tensor(rows, device: keys.device);                                      // (B)
        keys.view(Batch * Capacity, -1).index_copy_(0, index, k.reshape(Batch, -1).to(keys.dtype));     // (B, H·Dk)
        values.view(Batch * Capacity, -1).index_copy_(0, index, v.reshape(Batch, -1).to(values.dtype));
    }

    /// <summary>Stores a prompt: row b's positions [0, lengths[b]) (only the last Capacity of them are kept).</summary>
    /// <param name="k">(B, H, T, Dk), right-padded.</param>
    /// <param name="v">(B, H, T, Dv).</param>
    /// <param name="lengths">Real tokens per row (≤ T).</param>
    public void WritePrompt(Tensor k, Tensor v, int[] lengths)
    {
        long seqLen = k.shape[2];
        using var scope = NewDisposeScope();
        var source = new List<long>();
        var target = new List<long>();
        for (int b = 0; b < Batch; b++)
            for (int p = Math.Max(0, lengths[b] - Capacity); p < lengths[b]; p++)
            {
                source.Add(b * seqLen + p);
                target.Add(b * Capacity + Slot(p));
            }
        if (source.Count == 0) return;
        var from = tensor(source.ToArray(), device: keys.device);
        var to = tensor(target.ToArray(), device: keys.device);
        var kRows = k.transpose(1, 2).reshape(Batch * seqLen, -1).index_select(0, from);     // (n, H·Dk)
        var vRows = v.transpose(1, 2).reshape(Batch * seqLen, -1).index_select(0, from);     // (n, H·Dv)
        keys.view(Batch * Capacity, -1).index_copy_(0, to, kRows.to(keys.dtype));
        values.view(Batch * Capacity, -1).index_copy_(0, to, vRows.to(values.dtype));
    }

    public void Dispose()
    {
        keys.Dispose();
        values.Dispose();
    }
}
