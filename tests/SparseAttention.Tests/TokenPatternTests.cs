using System.Text;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// Token-defined patterns (all / local / window / strided / fixed) against their contract, written
/// here a second time with whole-tensor ops (arange, outer differences, floor_divide, remainder,
/// tril/triu, logical ops) rather than the library's per-pair index arithmetic.
/// </summary>
public class TokenPatternTests
{
    public static readonly int[] Lengths = [1, 7, 16, 33, 64];
    public static readonly int[] BlockSizes = [1, 4, 8, 16];
    public static readonly int[] HeadCounts = [1, 4];

    // ------------------------------------------------------------------------------------------
    // Independent definitions
    // ------------------------------------------------------------------------------------------

    /// <summary>Broadcastable index grids: I = query (1,T,1), J = key (1,1,T), Hd = head (H,1,1).</summary>
    private sealed class Grid
    {
        public Grid(int t, int h)
        {
            T = t; H = h;
            I = arange(t, dtype: ScalarType.Int64).view(1, t, 1);
            J = arange(t, dtype: ScalarType.Int64).view(1, 1, t);
            Hd = arange(h, dtype: ScalarType.Int64).view(h, 1, 1);
            D = I - J;
            Ones = ones(new long[] { t, t }, dtype: ScalarType.Bool);
            Lower = Ones.tril().view(1, t, t);
        }

        public int T { get; }
        public int H { get; }
        public Tensor I { get; }
        public Tensor J { get; }
        public Tensor Hd { get; }
        /// <summary>i − j, shape (1,T,T).</summary>
        public Tensor D { get; }
        public Tensor Ones { get; }
        /// <summary>j ≤ i, from tril, shape (1,T,T).</summary>
        public Tensor Lower { get; }

        public Tensor Full(Tensor m) => m.expand(H, T, T).contiguous();
        public Tensor Causal(Tensor m, bool causal) => causal ? m.logical_and(Lower) : m;
    }

    private static Tensor ExpAll(Grid g, bool causal) =>
        g.Full(causal ? g.Lower : g.Ones.view(1, g.T, g.T));

    // Band from triu/tril diagonals: triu(−(C−1)) keeps i − j ≤ C − 1, tril(C − 1) keeps j − i ≤ C − 1.
    private static Tensor ExpLocal(Grid g, int c, bool causal)
    {
        var band = g.Ones.triu(-(c - 1)).logical_and(causal ? g.Ones.tril() : g.Ones.tril(c - 1));
        return g.Full(band.view(1, g.T, g.T));
    }

    // Constants enter the expectations as 0-dim tensors, not as implicit TorchSharp Scalars: a temporary Scalar can be
    // finalized by a garbage collection while libtorch still reads it (TorchSharp passes only its handle), which under
    // parallel tests failed as "Expected false to be true ... toLong". A tensor is held by the test's dispose scope.
    private static Tensor K(long value) => tensor(value);

    private static Tensor ExpWindow(Grid g, int w, int back, int fwd, bool exact, bool causal)
    {
        var wi = g.I.floor_divide(K(w));
        var wj = g.J.floor_divide(K(w));
        var m = wj.ge(wi - K(back)).logical_and(wj.le(wi + K(fwd)));
        if (exact) m = m.logical_and(g.D.le(K(w * back))).logical_and(g.D.neg().le(K(w * fwd)));
        return g.Full(g.Causal(m, causal));
    }

    private static (Tensor A, Tensor B) ExpStridedParts(Grid g, int l, bool causal) =>
        (g.Causal(g.D.abs().lt(K(l)), causal), g.Causal(g.D.remainder(K(l)).eq(K(0)), causal));

    private static (Tensor A, Tensor B) ExpFixedParts(Grid g, int l, int c, int v, bool causal)
    {
        var a = g.I.floor_divide(K(l)).eq(g.J.floor_divide(K(l)));           // (1,T,T)
        var fromEnd = g.J.remainder(K(l)).neg().add(K(l - 1));                // (1,1,T): L−1 − j mod L
        var shift = g.Hd.remainder(K(v)).mul(K(c));                           // (H,1,1)
        var b = fromEnd.ge(shift).logical_and(fromEnd.le(shift + K(c - 1)));  // (H,1,T)
        b = b.logical_and(g.Ones.view(1, g.T, g.T));                          // (H,T,T)
        return (g.Causal(a, causal), g.Causal(b, causal));
    }

    private static Tensor Combine(Grid g, Tensor a, Tensor b, FactorizedCombine combine, int layer) => combine switch
    {
        FactorizedCombine.Merged => g.Full(a.logical_or(b)),
        FactorizedCombine.MultiHead => g.Full(where(g.Hd.remainder(K(2)).eq(K(0)), a, b)),
        _ => g.Full(layer % 2 == 0 ? a : b),
    };

    // ------------------------------------------------------------------------------------------
    // Pattern catalogue: name → (library pattern, independent expectation)
    // ------------------------------------------------------------------------------------------

    private sealed record Spec(
        Func<bool, AttentionPattern> Make,
        Func<Grid, bool, Tensor> Expected,
        bool CausalAllowed = true,
        bool BidirectionalAllowed = true);

    private static readonly Dictionary<string, Spec> Specs = BuildSpecs();

    private static Dictionary<string, Spec> BuildSpecs()
    {
        var s = new Dictionary<string, Spec>
        {
            ["all"] = new(c => new DensePattern(c), (g, c) => ExpAll(g, c)),
        };
        foreach (int ctx in new[] { 1, 3, 8, 40 })
            s[$"local ctx={ctx}"] = new(c => new LocalBandPattern(ctx, c), (g, c) => ExpLocal(g, ctx, c));

        foreach (var (w, b, f, exact) in new[]
                 {
                     (4, 1, 0, false), (4, 1, 0, true), (5, 2, 0, false), (5, 2, 0, true), (4, 0, 0, false),
                     (3, 0, 0, true), (1, 3, 0, false), (7, 1, 0, true),
                     // look_forward > 0: bidirectional only (causal is an error).
                     (4, 1, 1, false), (3, 1, 2, true), (6, 0, 1, true),
                 })
            s[$"window w={w} back={b} fwd={f}{(exact ? " exact" : "")}"] = new(
                c => new WindowPattern(w, b, f, exact, c),
                (g, c) => ExpWindow(g, w, b, f, exact, c),
                CausalAllowed: f == 0);

        foreach (var (l, comb, layer) in new[]
                 {
                     (4, FactorizedCombine.Merged, 0), (4, FactorizedCombine.MultiHead, 0),
                     (4, FactorizedCombine.Interleaved, 0), (4, FactorizedCombine.Interleaved, 1),
                     (5, FactorizedCombine.Merged, 0), (3, FactorizedCombine.MultiHead, 0),
                     (1, FactorizedCombine.Merged, 0), (8, FactorizedCombine.Interleaved, 3),
                 })
            s[$"strided L={l} {comb} layer={layer}"] = new(
                c => new StridedPattern(l, c, comb, layer),
                (g, c) => { var (a, b) = ExpStridedParts(g, l, c); return Combine(g, a, b, comb, layer); });

        foreach (var (l, vs, nv, comb, layer) in new[]
                 {
                     (8, 2, 2, FactorizedCombine.Merged, 0), (8, 2, 2, FactorizedCombine.MultiHead, 0),
                     (8, 2, 2, FactorizedCombine.Interleaved, 0), (8, 2, 2, FactorizedCombine.Interleaved, 1),
                     (6, 1, 3, FactorizedCombine.MultiHead, 0), (6, 1, 3, FactorizedCombine.Merged, 0),
                     (5, 2, 1, FactorizedCombine.Merged, 0), (4, 1, 4, FactorizedCombine.Merged, 0),
                     (7, 3, 2, FactorizedCombine.Interleaved, 1), (16, 16, 1, FactorizedCombine.Merged, 0),
                 })
            s[$"fixed L={l} c={vs} v={nv} {comb} layer={layer}"] = new(
                c => new FixedPattern(l, vs, nv, c, comb, layer),
                (g, c) => { var (a, b) = ExpFixedParts(g, l, vs, nv, c); return Combine(g, a, b, comb, layer); });
        return s;
    }

    private static IEnumerable<(string Name, bool Causal)> SpecVariants() =>
        from kv in Specs
        from causal in new[] { false, true }
        where causal ? kv.Value.CausalAllowed : kv.Value.BidirectionalAllowed
        select (kv.Key, causal);

    public static TheoryData<string, bool, int, int, int> DenseCases()
    {
        var data = new TheoryData<string, bool, int, int, int>();
        foreach (var (name, causal) in SpecVariants())
            foreach (int t in Lengths)
                foreach (int b in BlockSizes)
                    foreach (int h in HeadCounts)
                        data.Add(name, causal, t, b, h);
        return data;
    }

    public static TheoryData<string, bool, int, int> PatternLengthHeads(int[] lengths, int[] heads)
    {
        var data = new TheoryData<string, bool, int, int>();
        foreach (var (name, causal) in SpecVariants())
            foreach (int t in lengths)
                foreach (int h in heads)
                    data.Add(name, causal, t, h);
        return data;
    }

    public static TheoryData<string, bool, int, int> InvarianceCases() => PatternLengthHeads([7, 33, 64], [4]);

    public static TheoryData<string, bool, int, int, int> CompiledCases()
    {
        var data = new TheoryData<string, bool, int, int, int>();
        foreach (var (name, causal) in SpecVariants())
            foreach (var (t, b) in new[] { (7, 4), (33, 8), (33, 16), (16, 4), (5, 8) })
                data.Add(name, causal, t, b, 4);
        return data;
    }

    public static TheoryData<string> CausalNames()
    {
        var data = new TheoryData<string>();
        foreach (var (name, causal) in SpecVariants()) if (causal) data.Add(name);
        return data;
    }

    // ------------------------------------------------------------------------------------------
    // Helpers
    // ------------------------------------------------------------------------------------------

    private static void AssertMaskEqual(Tensor expected, Tensor actual, string context)
    {
        Assert.Equal(ScalarType.Bool, actual.dtype);
        Assert.Equal(expected.shape, actual.shape);
        if (SameMask(expected, actual)) return;
        var diff = expected.logical_xor(actual).nonzero();
        var sb = new StringBuilder($"{context}: {diff.shape[0]} mismatching (head, query, key) cells; first ones:");
        for (long r = 0; r < Math.Min(8, diff.shape[0]); r++)
        {
            long h = diff[r, 0].item<long>(), i = diff[r, 1].item<long>(), j = diff[r, 2].item<long>();
            sb.Append($" (h={h}, i={i}, j={j}: expected {expected[h, i, j].item<bool>()})");
        }
        Assert.Fail(sb.ToString());
    }

    /// <summary>Same shape and every element equal (TorchSharp's <c>torch.equal</c> is element-wise).</summary>
    private static bool SameMask(Tensor a, Tensor b) =>
        a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    /// <summary>
    /// Per (head, query block, key block): visited = some real pair allowed; full = every real pair
    /// allowed and the key block is not cut short. Both computed by padding the dense mask and
    /// reducing (H, nb, bs, nb, bs) tiles.
    /// </summary>
    private static (Tensor Visited, Tensor Full) ExpectedBlockFlags(Tensor dense, int blockSize)
    {
        int h = (int)dense.shape[0], t = (int)dense.shape[1];
        int nb = (t + blockSize - 1) / blockSize, p = nb * blockSize;
        var none = zeros(new long[] { h, p, p }, dtype: ScalarType.Bool);
        none[.., ..t, ..t] = dense;
        // For "full": padding queries don't count (true), padding keys make the block not full (false).
        var forFull = zeros(new long[] { h, p, p }, dtype: ScalarType.Bool);
        forFull[.., t.., ..] = tensor(true);
        forFull[.., ..t, ..t] = dense;
        var tiles = none.to_type(ScalarType.Int64).view(h, nb, blockSize, nb, blockSize).sum(new long[] { 2, 4 });
        var fullTiles = forFull.to_type(ScalarType.Int64).view(h, nb, blockSize, nb, blockSize).sum(new long[] { 2, 4 });
        return (tiles.gt(K(0)), fullTiles.eq(K((long)blockSize * blockSize)));
    }

    /// <summary><see cref="ExpectedBlockFlags"/> as (head, query block, key block) → bool lookups.</summary>
    private static (Func<int, int, int, bool> Visited, Func<int, int, int, bool> Full) BlockFlagLookups(Tensor dense, int blockSize)
    {
        var (visited, full) = ExpectedBlockFlags(dense, blockSize);
        int nb = (int)visited.shape[1];
        bool[] v = visited.data<bool>().ToArray(), f = full.data<bool>().ToArray();
        return ((h, qb, kb) => v[(h * nb + qb) * nb + kb], (h, qb, kb) => f[(h * nb + qb) * nb + kb]);
    }

    // ------------------------------------------------------------------------------------------
    // The dense mask equals the contract
    // ------------------------------------------------------------------------------------------

    [Theory]
    [MemberData(nameof(DenseCases))]
    public void DenseMaskMatchesDefinition(string pattern, bool causal, int seqLen, int blockSize, int heads)
    {
        using var scope = NewDisposeScope();
        var spec = Specs[pattern];
        var p = spec.Make(causal);
        var expected = spec.Expected(new Grid(seqLen, heads), causal);
        var mask = p.Compile(seqLen, blockSize, heads);
        AssertMaskEqual(expected, mask.ToDense(), $"{p.Name} T={seqLen} block={blockSize} H={heads}");
    }

    [Theory]
    [MemberData(nameof(InvarianceCases))]
    public void DenseMaskDoesNotDependOnBlockSize(string pattern, bool causal, int seqLen, int heads)
    {
        using var scope = NewDisposeScope();
        var p = Specs[pattern].Make(causal);
        var reference = p.Compile(seqLen, 1, heads).ToDense();
        foreach (int b in new[] { 2, 3, 4, 8, 16, 64, 100 })
            AssertMaskEqual(reference, p.Compile(seqLen, b, heads).ToDense(), $"{p.Name} T={seqLen} block={b} vs block=1");
    }

    [Theory]
    [MemberData(nameof(CompiledCases))]
    public void BlockMaskAgreesWithPatternAndDense(string pattern, bool causal, int seqLen, int blockSize, int heads)
    {
        using var scope = NewDisposeScope();
        var p = Specs[pattern].Make(causal);
        var mask = p.Compile(seqLen, blockSize, heads);
        var dense = mask.ToDense();
        var flat = dense.data<bool>().ToArray();
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < seqLen; i++)
                for (int j = 0; j < seqLen; j++)
                {
                    bool fromPattern = p.Allows(h, i, j, seqLen);
                    bool fromMask = mask.Allows(h, i, j);
                    bool fromDense = flat[((long)h * seqLen + i) * seqLen + j];
                    if (fromPattern != fromMask || fromMask != fromDense)
                        Assert.Fail($"{p.Name} T={seqLen} block={blockSize} (h={h}, i={i}, j={j}): pattern {fromPattern}, BlockMask.Allows {fromMask}, ToDense {fromDense}");
                }
        // Out-of-range positions are never allowed.
        Assert.False(mask.Allows(0, seqLen, 0));
        Assert.False(mask.Allows(0, 0, seqLen));
        Assert.False(mask.Allows(0, -1, 0));
        Assert.False(mask.Allows(0, 0, -1));
    }

    [Theory]
    [MemberData(nameof(CompiledCases))]
    public void VisitedBlocksAndPartialFlagsMatchDense(string pattern, bool causal, int seqLen, int blockSize, int heads)
    {
        using var scope = NewDisposeScope();
        var p = Specs[pattern].Make(causal);
        var mask = p.Compile(seqLen, blockSize, heads);
        var dense = Specs[pattern].Expected(new Grid(seqLen, heads), causal);
        var (visited, full) = BlockFlagLookups(dense, blockSize);
        int nb = mask.NumBlocks;
        Assert.Equal((seqLen + blockSize - 1) / blockSize, nb);
        Assert.Equal(nb * blockSize, mask.PaddedLength);
        int entries = 0, maxPerRow = 0;
        for (int h = 0; h < heads; h++)
        {
            var layout = mask.Layout(h);
            for (int qb = 0; qb < nb; qb++)
            {
                var kbs = mask.KeyBlocks(h, qb).ToArray();
                entries += kbs.Length;
                maxPerRow = Math.Max(maxPerRow, kbs.Length);
                Assert.True(kbs.SequenceEqual(kbs.Order()), $"{p.Name}: key blocks of (h={h}, qb={qb}) not increasing");
                var expectedKbs = Enumerable.Range(0, nb).Where(kb => visited(h, qb, kb)).ToArray();
                Assert.True(expectedKbs.SequenceEqual(kbs),
                    $"{p.Name} T={seqLen} block={blockSize} (h={h}, qb={qb}): visited [{string.Join(",", kbs)}], expected [{string.Join(",", expectedKbs)}]");
                for (int e = 0; e < kbs.Length; e++)
                {
                    bool expectFull = full(h, qb, kbs[e]);
                    Assert.True(expectFull != mask.IsPartial(h, qb, e),
                        $"{p.Name} T={seqLen} block={blockSize} (h={h}, qb={qb}, kb={kbs[e]}): expected {(expectFull ? "full" : "partial")}");
                }
                for (int kb = 0; kb < nb; kb++) Assert.Equal(kbs.Contains(kb), layout[qb, kb]);
            }
        }
        Assert.Equal(entries, mask.VisitedBlocks);
        Assert.Equal(maxPerRow, mask.MaxKeyBlocksPerRow);
        Assert.Equal((double)entries / ((long)heads * nb * nb), mask.BlockDensity, 12);
    }

    [Theory]
    [MemberData(nameof(CompiledCases))]
    public void DensityAndSparsityAreCountedFractions(string pattern, bool causal, int seqLen, int blockSize, int heads)
    {
        using var scope = NewDisposeScope();
        var p = Specs[pattern].Make(causal);
        var mask = p.Compile(seqLen, blockSize, heads);
        var dense = Specs[pattern].Expected(new Grid(seqLen, heads), causal);
        double fraction = dense.to_type(ScalarType.Int64).sum().item<long>() / ((double)heads * seqLen * seqLen);
        Assert.Equal(fraction, mask.Density, 12);
        Assert.Equal(1 - fraction, mask.Sparsity, 12);
        Assert.InRange(mask.Density, 0.0, 1.0);
    }

    [Theory]
    [MemberData(nameof(CompiledCases))]
    public void AsciiHasOneRowPerQueryBlockPerDrawnHead(string pattern, bool causal, int seqLen, int blockSize, int heads)
    {
        using var scope = NewDisposeScope();
        var p = Specs[pattern].Make(causal);
        var mask = p.Compile(seqLen, blockSize, heads);
        var dense = mask.ToDense();
        var (visited, full) = BlockFlagLookups(dense, blockSize);
        int nb = mask.NumBlocks;

        foreach (int maxHeads in new[] { int.MaxValue, 1, 3 })
        {
            var lines = mask.ToAscii(maxHeads).Split('\n').Select(l => l.TrimEnd('\r')).Where(l => l.Length > 0).ToList();
            Assert.StartsWith(p.Name, lines[0]);
            int at = 1, drawn = Math.Min(heads, maxHeads);
            for (int h = 0; h < drawn; h++)
            {
                // A head identical to the previous one is summarised in one line instead of redrawn.
                if (h > 0 && SameMask(dense[h], dense[h - 1]))
                {
                    Assert.Equal($"head {h}: same as head {h - 1}", lines[at++]);
                    continue;
                }
                Assert.Equal($"head {h}:", lines[at++]);
                for (int qb = 0; qb < nb; qb++)
                {
                    var row = lines[at++];
                    Assert.StartsWith("  ", row);
                    var cells = row[2..];
                    Assert.Equal(nb, cells.Length);
                    for (int kb = 0; kb < nb; kb++)
                    {
                        char want = !visited(h, qb, kb) ? '·' : full(h, qb, kb) ? '█' : '▒';
                        Assert.True(want == cells[kb], $"{p.Name} head {h} row {qb} col {kb}: '{cells[kb]}', expected '{want}'");
                    }
                }
            }
            if (maxHeads < heads) Assert.Equal($"({heads - maxHeads} more heads not drawn)", lines[at++]);
            Assert.Equal(lines.Count, at);
        }
    }

    [Fact]
    public void AsciiDrawsEveryQueryBlockRowForDistinctHeads()
    {
        // fixed multi-head: heads 0/2 differ from 1/3 — no head is the same as its predecessor.
        var mask = new FixedPattern(8, 2, 2, causal: true, FactorizedCombine.MultiHead).Compile(33, 4, 4);
        var rows = mask.ToAscii().Split('\n').Select(l => l.TrimEnd('\r')).Where(l => l.StartsWith("  ")).ToList();
        Assert.Equal(4 * mask.NumBlocks, rows.Count);
        Assert.All(rows, r => Assert.Equal(2 + mask.NumBlocks, r.Length));
    }

    // ------------------------------------------------------------------------------------------
    // Causality
    // ------------------------------------------------------------------------------------------

    [Theory]
    [MemberData(nameof(CausalNames))]
    public void CausalPatternsNeverAttendTheFuture(string pattern)
    {
        using var scope = NewDisposeScope();
        var causalPattern = Specs[pattern].Make(true);
        Assert.True(causalPattern.IsCausal, causalPattern.Name);
        foreach (var (t, b) in new[] { (1, 1), (33, 8), (64, 16), (37, 5) })
        {
            var mask = causalPattern.Compile(t, b, 4);
            Assert.True(mask.IsCausal);
            Assert.False(mask.ToDense().triu(1).any().item<bool>(), $"{causalPattern.Name} T={t} block={b} allows j > i");
        }
        if (Specs[pattern].BidirectionalAllowed) Assert.False(Specs[pattern].Make(false).IsCausal);
    }

    // ------------------------------------------------------------------------------------------
    // Combinators
    // ------------------------------------------------------------------------------------------

    public static TheoryData<string, bool, string, bool, int, int> CombinatorCases()
    {
        var data = new TheoryData<string, bool, string, bool, int, int>();
        var pairs = new (string, bool, string, bool)[]
        {
            ("local ctx=8", true, "strided L=3 MultiHead layer=0", true),
            ("local ctx=3", false, "fixed L=6 c=1 v=3 MultiHead layer=0", false),
            ("window w=4 back=1 fwd=1", false, "all", true),
            ("fixed L=8 c=2 v=2 Merged layer=0", true, "window w=5 back=2 fwd=0 exact", false),
            ("strided L=4 Merged layer=0", false, "fixed L=4 c=1 v=4 Merged layer=0", true),
        };
        foreach (var (a, ca, b, cb) in pairs)
            foreach (var (t, bs) in new[] { (7, 4), (33, 8), (64, 16) })
                data.Add(a, ca, b, cb, t, bs);
        return data;
    }

    [Theory]
    [MemberData(nameof(CombinatorCases))]
    public void AndOrMatchLogicalCombination(string a, bool causalA, string b, bool causalB, int seqLen, int blockSize)
    {
        using var scope = NewDisposeScope();
        const int heads = 4;
        var g = new Grid(seqLen, heads);
        Tensor ea = Specs[a].Expected(g, causalA), eb = Specs[b].Expected(g, causalB);
        AttentionPattern pa = Specs[a].Make(causalA), pb = Specs[b].Make(causalB);

        var and = pa.And(pb);
        Assert.Equal(causalA || causalB, and.IsCausal);
        AssertMaskEqual(ea.logical_and(eb), and.Compile(seqLen, blockSize, heads).ToDense(), $"{and.Name} T={seqLen}");

        var or = pa.Or(pb);
        Assert.Equal(causalA && causalB, or.IsCausal);
        AssertMaskEqual(ea.logical_or(eb), or.Compile(seqLen, blockSize, heads).ToDense(), $"{or.Name} T={seqLen}");

        // Nested, with a predicate pattern: (A or B) and "key is even".
        var even = AttentionPattern.FromPredicate("even keys", isCausal: false, sameForAllHeads: true, (_, _, k, _) => k % 2 == 0);
        var nested = pa.Or(pb).And(even);
        var evenKeys = g.Full(g.J.remainder(K(2)).eq(K(0)).logical_and(g.Ones.view(1, seqLen, seqLen)));
        AssertMaskEqual(ea.logical_or(eb).logical_and(evenKeys), nested.Compile(seqLen, blockSize, heads).ToDense(), nested.Name);
    }

    [Theory]
    [InlineData(7, 4)]
    [InlineData(33, 8)]
    [InlineData(64, 16)]
    [InlineData(16, 1)]
    public void HeadGroupsRenumberHeadsInsideEachGroup(int seqLen, int blockSize)
    {
        using var scope = NewDisposeScope();
        // Group sizes are odd so that a missing renumbering flips the parity (multi-head strided/fixed)
        // and the num_verts cycle (fixed) of the later groups.
        var groups = new (string Name, bool Causal, int Heads)[]
        {
            ("local ctx=3", true, 3),
            ("strided L=4 MultiHead layer=0", true, 2),
            ("fixed L=6 c=1 v=3 MultiHead layer=0", true, 5),
            ("window w=4 back=1 fwd=0", true, 1),
        };
        var pattern = AttentionPattern.HeadGroups(groups.Select(gr => (Specs[gr.Name].Make(gr.Causal), gr.Heads)).ToArray());
        int total = groups.Sum(gr => gr.Heads);
        var expected = cat(groups.Select(gr => Specs[gr.Name].Expected(new Grid(seqLen, gr.Heads), gr.Causal)).ToList(), 0);
        Assert.True(pattern.IsCausal);
        Assert.False(pattern.SameForAllHeads);
        var mask = pattern.Compile(seqLen, blockSize, total);
        AssertMaskEqual(expected, mask.ToDense(), pattern.Name);

        // Head-group with a bidirectional member is not causal.
        var mixed = AttentionPattern.HeadGroups((new DensePattern(false), 1), (new LocalBandPattern(2, true), 2));
        Assert.False(mixed.IsCausal);
        var g3 = new Grid(seqLen, 1);
        var mixedExpected = cat(new List<Tensor> { ExpAll(g3, false), ExpLocal(new Grid(seqLen, 2), 2, true) }, 0);
        AssertMaskEqual(mixedExpected, mixed.Compile(seqLen, blockSize, 3).ToDense(), mixed.Name);
    }

    // ------------------------------------------------------------------------------------------
    // Bad input: the error names the argument
    // ------------------------------------------------------------------------------------------

    [Theory]
    [InlineData(0)]
    [InlineData(-3)]
    public void WindowSizeMustBePositive(int w) =>
        Assert.Throws<ArgumentException>("windowSize", () => new WindowPattern(w, 1, 0, false, true));

    [Theory]
    [InlineData(0)]
    [InlineData(-1)]
    public void BlockSizeMustBePositive(int b) =>
        Assert.Throws<ArgumentException>("blockSize", () => new LocalBandPattern(4, true).Compile(16, b, 2));

    [Fact]
    public void CausalWindowCannotLookForward()
    {
        Assert.Throws<ArgumentException>("lookForward", () => new WindowPattern(4, 1, 1, false, causal: true));
        Assert.Throws<ArgumentException>("lookForward", () => new WindowPattern(4, 1, -1, false, causal: false));
        Assert.Throws<ArgumentException>("lookBackward", () => new WindowPattern(4, -1, 0, false, causal: true));
    }

    [Fact]
    public void FixedSummaryCellsMustFitInOneBlock()
    {
        Assert.Throws<ArgumentException>("numVerts", () => new FixedPattern(8, 3, 3, causal: true));
        Assert.Throws<ArgumentException>("numVerts", () => new FixedPattern(4, 5, 1, causal: false));
        _ = new FixedPattern(8, 4, 2, causal: true); // exactly fills the block: fine
        Assert.Throws<ArgumentException>("vertsize", () => new FixedPattern(8, 0, 1, causal: true));
        Assert.Throws<ArgumentException>("numVerts", () => new FixedPattern(8, 1, 0, causal: true));
        Assert.Throws<ArgumentException>("stride", () => new FixedPattern(0, 1, 1, causal: true));
    }

    [Fact]
    public void HeadGroupHeadCountMustMatchAtCompile()
    {
        var p = AttentionPattern.HeadGroups((new LocalBandPattern(4, true), 2), (new StridedPattern(4, true), 3));
        Assert.Throws<ArgumentException>("heads", () => p.Compile(16, 4, 4));
        Assert.Throws<ArgumentException>("heads", () => p.Compile(16, 4, 6));
        Assert.Equal(5, p.Compile(16, 4, 5).Heads);
        Assert.Throws<ArgumentException>("groups[].Heads", () => AttentionPattern.HeadGroups((new DensePattern(true), 0)));
    }

    [Fact]
    public void OtherArgumentsAreChecked()
    {
        Assert.Throws<ArgumentException>("localAttnCtx", () => new LocalBandPattern(0, true));
        Assert.Throws<ArgumentException>("stride", () => new StridedPattern(0, true));
        Assert.Throws<ArgumentException>("layer", () => new StridedPattern(4, true, FactorizedCombine.Interleaved, -1));
        Assert.Throws<ArgumentException>("seqLen", () => new DensePattern(true).Compile(0, 4, 1));
        Assert.Throws<ArgumentException>("heads", () => new DensePattern(true).Compile(8, 4, 0));
    }
}
