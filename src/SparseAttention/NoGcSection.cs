using System.Runtime;

namespace SparseAttention;

/// <summary>
/// A stretch of code during which the .NET garbage collector does not run (<see cref="GC.TryStartNoGCRegion(long)"/>).
/// Why: TorchSharp turns numbers into <c>Scalar</c> objects implicitly (<c>x * 0.5</c>, <c>x.masked_fill(m, 0)</c>,
/// inside its optimizers too), hands libtorch their raw native handle and leaves them to a finalizer; a collection
/// triggered by any thread while libtorch still reads such a Scalar lets the finalizer free it under libtorch's feet.
/// libtorch then fails with "Expected false to be true, but got false" (or reads a wrong value) — after tens of minutes
/// of training, or within a second when another thread allocates (see NoGcSectionTests). Training steps, evaluation
/// batches and generated tokens run inside one; collections happen between them, when no such call is in flight.
/// </summary>
/// <remarks>Managed allocations inside a section beyond <see cref="BudgetBytes"/> end it early (the runtime collects
/// and goes on); nested sections and a runtime that refuses the region leave collections as they are.</remarks>
public readonly struct NoGcSection : IDisposable
{
    /// <summary>Managed bytes a section may allocate without a collection (a training step allocates a few MB).</summary>
    public const long BudgetBytes = 64L << 20;

    private readonly bool started;

    private NoGcSection(bool started) => this.started = started;

    /// <summary>Starts a section (one collection first, when the budget is not free); dispose to end it.</summary>
    public static NoGcSection Enter()
    {
        if (GCSettings.LatencyMode == GCLatencyMode.NoGCRegion) return default;   // nested: the outer section covers it
        try { return new NoGcSection(GC.TryStartNoGCRegion(BudgetBytes)); }
        catch (InvalidOperationException) { return default; }
        catch (ArgumentOutOfRangeException) { return default; }
    }

    /// <summary>Ends the section (nothing to do when the runtime already ended it: the budget was used up).</summary>
    public void Dispose()
    {
        if (!started || GCSettings.LatencyMode != GCLatencyMode.NoGCRegion) return;
        try { GC.EndNoGCRegion(); }
        catch (InvalidOperationException) { }                                     // ended early by a collection
    }
}
