using System.Runtime;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// <see cref="NoGcSection"/>: TorchSharp's implicit Scalars (here <c>masked_fill(mask, 0.25)</c>) are freed by their
/// finalizer when a collection, triggered by another thread's allocations, runs while libtorch still reads them. Outside
/// a section that fails within about a second here ("Expected false to be true"); inside sections it must not.
/// </summary>
[CollectionDefinition(nameof(NoGcSectionTests), DisableParallelization = true)]
public sealed class NoGcSectionCollection;

/// <remarks>Alone (no other test class in parallel): another test's explicit collection or large allocations would end
/// a section early.</remarks>
[Collection(nameof(NoGcSectionTests))]
public sealed class NoGcSectionTests
{
    /// <summary>Runs <paramref name="calls"/> masked fills with a temporary Scalar, in sections of 1000 calls when
    /// <paramref name="inSections"/>, while another thread allocates; returns the first exception, if any.</summary>
    private static Exception? Hammer(int calls, bool inSections)
    {
        using var scope = NewDisposeScope();
        var x = rand(64, 64, generator: new Generator(3));
        var mask = x.gt(0.5);
        bool stop = false;
        var churn = new Thread(() =>
        {
            while (!Volatile.Read(ref stop))
            {
                var junk = new byte[16][];
                for (int i = 0; i < junk.Length; i++) junk[i] = new byte[4096];
                GC.KeepAlive(junk);
            }
        });
        churn.Start();
        try
        {
            for (int done = 0; done < calls; done += 1000)
            {
                using var quiet = inSections ? NoGcSection.Enter() : default;
                for (int i = 0; i < 1000; i++)
                {
                    using var filled = x.masked_fill(mask, 0.25);                      // a temporary Scalar per call
                    if (i == 0 && filled.max().item<float>() > 0.5f) throw new InvalidOperationException("masked_fill wrote a wrong value");
                }
            }
            return null;
        }
        catch (Exception e) { return e; }
        finally
        {
            Volatile.Write(ref stop, true);
            churn.Join();
        }
    }

    [Fact]
    public void Temporary_scalars_survive_native_calls_inside_sections_while_another_thread_allocates()
    {
        var inside = Hammer(300_000, inSections: true);
        Assert.True(inside is null, $"inside sections: {inside}");
    }

    [Fact]
    public void Sections_stop_collections_and_end_cleanly_also_when_nested_or_over_budget()
    {
        using (NoGcSection.Enter())
        {
            int inside = GC.CollectionCount(0);
            Assert.Equal(GCLatencyMode.NoGCRegion, GCSettings.LatencyMode);
            using (NoGcSection.Enter()) { }                                            // nested: leaves the outer one on
            Assert.Equal(GCLatencyMode.NoGCRegion, GCSettings.LatencyMode);
            for (int i = 0; i < 256; i++) GC.KeepAlive(new byte[16 << 10]);           // 4 MB, within the budget
            Assert.Equal(inside, GC.CollectionCount(0));                              // no collection inside
        }
        Assert.NotEqual(GCLatencyMode.NoGCRegion, GCSettings.LatencyMode);
        using (NoGcSection.Enter())
            for (int i = 0; i < 100; i++) GC.KeepAlive(new byte[1 << 20]);            // 100 MB: the runtime ends it early
        Assert.NotEqual(GCLatencyMode.NoGCRegion, GCSettings.LatencyMode);
    }
}
