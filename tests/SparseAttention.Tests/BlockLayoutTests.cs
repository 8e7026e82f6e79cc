using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// DeepSpeed-style block layouts. Expected layouts are written here independently of the library:
/// as predicates over (row, column) read from DeepSpeed's rules (sparsity_config.py), plus a few
/// layouts drawn by hand. Token-level checks expand a layout with tensor ops.
/// </summary>
public class BlockLayoutTests
{
    private const int B = 4;   // layout block used by the token-level tests

    // ---------- independent expectations ----------

    private static bool[,] Grid(int n, Func<int, int, bool> f)
    {
        var g = new bool[n, n];
        foreach (var (r, c) in from r in Enumerable.Range(0, n) from c in Enumerable.Range(0, n) select (r, c)) g[r, c] = f(r, c);
        return g;
    }

    private static bool[,] Draw(params string[] rows) => Grid(rows.Length, (r, c) => rows[r][c] == 'x');

    private static string Show(bool[,] g) => string.Join("\n",
        Enumerable.Range(0, g.GetLength(0)).Select(r => new string(Enumerable.Range(0, g.GetLength(1)).Select(c => g[r, c] ? 'x' : '.').ToArray())));

    private static void SameLayout(bool[,] expected, bool[,] actual, string what) =>
        Assert.True(Show(expected) == Show(actual), $"{what}\nexpected:\n{Show(expected)}\nactual:\n{Show(actual)}");

    /// Fixed: same local window, or a summary group (start g, G columns) that the row may see.
    private static bool[,] FixedExpected(int nb, int local, int global, int pattern, bool causal, bool horizontal)
    {
        int offset = local - (pattern + 1) * global;
        var groups = Enumerable.Range(0, nb / local).Select(w => w * local + offset).ToList();
        if (nb % local != 0) groups.Add(Math.Max(0, Math.Min(nb / local * local + offset, nb - global)));
        bool InGroup(int g, int x) => x >= g && x < g + global;
        return Grid(nb, (r, c) =>
            (r / local == c / local && (!causal || c <= r))
            || groups.Any(g => InGroup(g, c) && (!causal || r >= g))
            || (horizontal && groups.Any(g => InGroup(g, r))));
    }

    /// Variable without random blocks: window ids from the size list (last size repeated).
    private static bool[,] VariableExpected(int nb, int[] windows, int[] starts, int[]? ends, bool causal, bool horizontal)
    {
        int[] windowOf = windows.Concat(Enumerable.Repeat(windows[^1], nb))
            .SelectMany((size, id) => Enumerable.Repeat(id, size)).Take(nb).ToArray();
        var ranges = starts.Select((s, i) => (S: s, E: ends is null ? s + 1 : ends[i])).Where(x => x.S < nb).ToList();
        return Grid(nb, (r, c) =>
            (windowOf[r] == windowOf[c] && (!causal || c <= r))
            || ranges.Any(x => c >= x.S && c < x.E && (!causal || r >= x.S))
            || (horizontal && ranges.Any(x => r >= x.S && r < x.E)));
    }

    /// BigBird without random blocks.
    private static bool[,] BigBirdExpected(int nb, int window, int global, bool causal) =>
        Grid(nb, (r, c) => (Math.Abs(r - c) <= window / 2 || r < global || c < global) && (!causal || c <= r));

    private static bool[,] LongformerExpected(int nb, int window, int[] starts, int[]? ends, bool causal)
    {
        var globalBlocks = starts.SelectMany((s, i) => s < nb ? Enumerable.Range(s, Math.Min(ends is null ? s + 1 : ends[i], nb) - s) : [])
            .ToHashSet();
        return Grid(nb, (r, c) =>
            (Math.Abs(r - c) <= window / 2 || globalBlocks.Contains(r) || globalBlocks.Contains(c)) && (!causal || c <= r));
    }

    private static bool[,] SlidingExpected(int nb, int window, bool causal) =>
        Grid(nb, (r, c) => causal ? r - c >= 0 && r - c <= window / 2 : Math.Abs(r - c) <= window / 2);

    // ---------- the cases: a pattern and (for non-random kinds) its expected layout ----------

    /// <summary>A pattern and its expected layout; random kinds have no single expected layout but a fixed part
    /// (everything except the random blocks), a random count per row and whether the random blocks stay causal.</summary>
    private sealed record Case(BlockLayoutPattern Pattern, Func<int, int, bool[,]>? Expected, int MinBlocks = 1,
        Func<int, bool[,]>? FixedPart = null, int Random = 0, bool RandomCausal = false);

    private static Case Make(string kind, bool causal) => kind switch
    {
        "fixed" => new(new DsFixedPattern(B, causal, numLocalBlocks: 3, numGlobalBlocks: 1),
            (h, nb) => FixedExpected(nb, 3, 1, 0, causal, false)),
        "fixed-patterns" => new(new DsFixedPattern(B, causal, numLocalBlocks: 4, numGlobalBlocks: 2,
                horizontalGlobalAttention: !causal, numDifferentGlobalPatterns: 2, differentLayoutPerHead: true),
            (h, nb) => FixedExpected(nb, 4, 2, h % 2, causal, !causal)),
        "fixed-per-head-one-pattern" => new(new DsFixedPattern(B, causal, numLocalBlocks: 2, differentLayoutPerHead: true),
            (h, nb) => FixedExpected(nb, 2, 1, 0, causal, false)),
        "variable" => new(new DsVariablePattern(B, causal, 0, [1, 2], [0, 4], null, horizontalGlobalAttention: !causal),
            (h, nb) => VariableExpected(nb, [1, 2], [0, 4], null, causal, !causal)),
        "variable-ranges" => new(new DsVariablePattern(B, causal, 0, [3], [1, 5], [3, 6], differentLayoutPerHead: true),
            (h, nb) => VariableExpected(nb, [3], [1, 5], [3, 6], causal, false)),
        "variable-random" => new(new DsVariablePattern(B, causal, 2, [2], [0], null, differentLayoutPerHead: true, seed: 7),
            null, MinBlocks: 2, FixedPart: nb => VariableExpected(nb, [2], [0], null, causal, false), Random: 2),
        "bigbird" => new(new BigBirdPattern(B, causal, numRandomBlocks: 0, numSlidingWindowBlocks: 3, numGlobalBlocks: 1),
            (h, nb) => BigBirdExpected(nb, 3, 1, causal), MinBlocks: 3),
        "bigbird-even-window" => new(new BigBirdPattern(B, causal, numRandomBlocks: 0, numSlidingWindowBlocks: 2, numGlobalBlocks: 2),
            (h, nb) => BigBirdExpected(nb, 2, 2, causal), MinBlocks: 2),
        "bigbird-random" => new(new BigBirdPattern(B, causal, numRandomBlocks: 2, numSlidingWindowBlocks: 1, numGlobalBlocks: 1,
            differentLayoutPerHead: true, seed: 3), null, MinBlocks: 2, FixedPart: nb => BigBirdExpected(nb, 1, 1, causal), Random: 2,
            RandomCausal: causal),
        "longformer" => new(new LongformerPattern(B, causal, 3, [0, 3]),
            (h, nb) => LongformerExpected(nb, 3, [0, 3], null, causal), MinBlocks: 3),
        "longformer-ranges" => new(new LongformerPattern(B, causal, 2, [1, 6], [3, 9], differentLayoutPerHead: true),
            (h, nb) => LongformerExpected(nb, 2, [1, 6], [3, 9], causal), MinBlocks: 2),
        "sliding" => new(new SlidingWindowPattern(B, causal, 3), (h, nb) => SlidingExpected(nb, 3, causal), MinBlocks: 3),
        "sliding-even" => new(new SlidingWindowPattern(B, causal, 4), (h, nb) => SlidingExpected(nb, 4, causal), MinBlocks: 4),
        _ => throw new ArgumentException(kind),
    };

    private static readonly string[] Kinds =
    [
        "fixed", "fixed-patterns", "fixed-per-head-one-pattern", "variable", "variable-ranges", "variable-random",
        "bigbird", "bigbird-even-window", "bigbird-random", "longformer", "longformer-ranges", "sliding", "sliding-even",
    ];

    public static TheoryData<string, bool> KindsAndCausal()
    {
        var data = new TheoryData<string, bool>();
        foreach (var k in Kinds) { data.Add(k, false); data.Add(k, true); }
        return data;
    }

    // ---------- layouts ----------

    [Theory]
    [MemberData(nameof(KindsAndCausal))]
    public void LayoutMatchesIndependentDefinition(string kind, bool causal)
    {
        var c = Make(kind, causal);
        for (int nb = c.MinBlocks; nb <= 13; nb++)
            for (int h = 0; h < 5; h++)
            {
                var actual = c.Pattern.Layout(h, nb);
                Assert.Equal(nb, actual.GetLength(0));
                Assert.Equal(nb, actual.GetLength(1));
                if (c.Expected is not null) SameLayout(c.Expected(h, nb), actual, $"{c.Pattern.Name} head {h} numBlocks {nb}");
                else AssertRandomRules(c, actual, $"{c.Pattern.Name} head {h} numBlocks {nb}");
            }
    }

    /// <summary>The rules of a random layout, checked without the library's Layout as a reference: the fixed part is
    /// all there; each row adds at most Random blocks beyond it (fewer when a draw lands on the fixed part); causal
    /// BigBird draws only blocks at or left of the diagonal.</summary>
    private static void AssertRandomRules(Case c, bool[,] actual, string what)
    {
        int nb = actual.GetLength(0);
        var fixedPart = c.FixedPart!(nb);
        for (int r = 0; r < nb; r++)
        {
            int extra = 0;
            for (int col = 0; col < nb; col++)
            {
                Assert.True(!fixedPart[r, col] || actual[r, col], $"{what}: fixed block ({r}, {col}) missing");
                if (!actual[r, col] || fixedPart[r, col]) continue;
                extra++;
                Assert.True(!c.RandomCausal || col <= r, $"{what}: random block ({r}, {col}) above the diagonal");
            }
            Assert.True(extra <= c.Random, $"{what}: row {r} has {extra} blocks beyond the fixed part, more than {c.Random} random ones");
        }
    }

    /// <summary>
    /// Random blocks are drawn uniformly without replacement from their candidates: over many seeds, each candidate
    /// column of row r is chosen with probability min(k, n) / n (n = r + 1 for causal BigBird, all blocks otherwise).
    /// Window 1 and no global blocks leave only the diagonal as fixed part, so every other block seen is a random one.
    /// Pearson's χ² over all (row, column) cells against the 1e-6 bound. Mutations checked by hand in MarkRandom's
    /// Fisher–Yates step: drawing from [i, n − 1) (never the last candidate; χ² 1059–1649 against bounds 78–122) or
    /// from [i + 1, n) (never keeping the current one; χ² 719–861) fail all four cases.
    /// </summary>
    [Theory]
    [InlineData("bigbird", false)]
    [InlineData("bigbird", true)]
    [InlineData("variable", false)]
    [InlineData("variable", true)]
    public void RandomBlocksAreUniformOverTheirCandidatesAcrossSeeds(string kind, bool causal)
    {
        const int nb = 8, k = 2, seeds = 600;
        var hits = new int[nb, nb];
        for (int seed = 0; seed < seeds; seed++)
        {
            BlockLayoutPattern p = kind == "bigbird"
                ? new BigBirdPattern(B, causal, k, numSlidingWindowBlocks: 1, numGlobalBlocks: 0, seed: seed)
                : new DsVariablePattern(B, causal, k, [1], [], seed: seed);
            var layout = p.Layout(0, nb);
            for (int r = 0; r < nb; r++)
                for (int c = 0; c < nb; c++)
                    if (layout[r, c] && c != r) hits[r, c]++;
        }
        double chi2 = 0;
        int cells = 0;
        for (int r = 0; r < nb; r++)
        {
            int candidates = kind == "bigbird" && causal ? r + 1 : nb;
            double prob = (double)Math.Min(k, candidates) / candidates;
            for (int c = 0; c < nb; c++)
            {
                if (c == r) continue;
                if (c >= candidates) { Assert.True(hits[r, c] == 0, $"row {r} drew block {c}, not a candidate"); continue; }
                if (prob >= 1) { Assert.Equal(seeds, hits[r, c]); continue; }
                double expected = seeds * prob;
                chi2 += Math.Pow(hits[r, c] - expected, 2) / (expected * (1 - prob));
                cells++;
            }
        }
        double bound = SamplingDistributionTests.ChiSquareBound(cells);
        Assert.True(chi2 < bound, $"χ² = {chi2:F1} ≥ {bound:F1} over {cells} cells");
    }

    [Fact]
    public void HandDrawnLayouts()
    {
        SameLayout(Draw("xxxx.x", "xxxx.x", "xxxx.x", "xxxx.x", "...xxx", "...xxx"),
            new DsFixedPattern(16, causal: false).Layout(0, 6), "fixed bidirectional");
        SameLayout(Draw("x.....", "xx....", "xxx...", "xxxx..", "...xx.", "...xxx"),
            new DsFixedPattern(16, causal: true).Layout(0, 6), "fixed causal");
        // Head 1 of two global patterns: summary block at offset 2 of each window; short window keeps the last block.
        SameLayout(Draw("xxxx.x", "xxxx.x", "xxxxxx", "xxxx.x", "..x.xx", "xxxxxx"),
            new DsFixedPattern(16, false, 4, 1, horizontalGlobalAttention: true, numDifferentGlobalPatterns: 2, differentLayoutPerHead: true).Layout(1, 6),
            "fixed head 1 horizontal");
        SameLayout(Draw("xxxxx", "xxx..", "xxxx.", "x.xxx", "x..xx"),
            new BigBirdPattern(16, false, numRandomBlocks: 0).Layout(0, 5), "bigbird bidirectional");
        SameLayout(Draw("x....", "xx...", "xxx..", "x.xx.", "x..xx"),
            new BigBirdPattern(16, true, numRandomBlocks: 0).Layout(0, 5), "bigbird causal");
        SameLayout(Draw("xxx.x.", "xxxxxx", "xxxxxx", ".xxxx.", "xxxxxx", ".xx.xx"),
            new LongformerPattern(16, false, 3, [1, 4], [3, 5]).Layout(0, 6), "longformer ranges");
        SameLayout(Draw("x....", "xx...", ".xx..", "..xx.", "...xx"),
            new SlidingWindowPattern(16, true, 3).Layout(0, 5), "sliding causal");
        SameLayout(Draw("xxx..", "xxxx.", "xxxxx", ".xxxx", "..xxx"),
            new SlidingWindowPattern(16, false, 4).Layout(0, 5), "sliding even window");
        SameLayout(Draw(
                "x.......x.",
                ".xx.....x.",
                ".xx.....x.",
                "...xxx..x.",
                "...xxx..x.",
                "...xxx..x.",
                "......xxx.",
                "......xxx.",
                "xxxxxxxxxx",
                "........xx"),
            new DsVariablePattern(16, false, 0, [1, 2, 3], [8], horizontalGlobalAttention: true).Layout(0, 10), "variable windows 1,2,3");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void RandomBlocksAddAtMostTheirCountOnTopOfTheFixedPart(bool causal)
    {
        for (int nb = 3; nb <= 12; nb++)
            for (int h = 0; h < 4; h++)
            {
                var bigbird = new BigBirdPattern(B, causal, 2, 3, 1, differentLayoutPerHead: true, seed: 11).Layout(h, nb);
                AssertRandomOnTop(BigBirdExpected(nb, 3, 1, causal), bigbird, 2);
                var variable = new DsVariablePattern(B, causal, 2, [3], [0, 5], differentLayoutPerHead: true, seed: 11).Layout(h, nb);
                AssertRandomOnTop(VariableExpected(nb, [3], [0, 5], null, causal, false), variable, 2);
            }

        static void AssertRandomOnTop(bool[,] fixedPart, bool[,] actual, int random)
        {
            int nb = fixedPart.GetLength(0);
            for (int r = 0; r < nb; r++)
            {
                int extra = 0;
                for (int c = 0; c < nb; c++)
                {
                    Assert.True(!fixedPart[r, c] || actual[r, c], $"fixed block ({r}, {c}) missing");
                    if (actual[r, c] && !fixedPart[r, c]) extra++;
                }
                Assert.True(extra <= random, $"row {r} has {extra} extra blocks, more than {random} random ones");
            }
        }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public void BigBirdDrawsExactlyItsRandomCountPerRow(int random)
    {
        // Window 1 and no global block leave only the diagonal, so a row holds its samples (+ diagonal).
        const int nb = 9;
        var bi = new BigBirdPattern(B, false, random, 1, 0, seed: 5).Layout(0, nb);
        var uni = new BigBirdPattern(B, true, random, 1, 0, seed: 5).Layout(0, nb);
        for (int r = 0; r < nb; r++)
        {
            int offDiagonal = Enumerable.Range(0, nb).Count(c => c != r && bi[r, c]);
            Assert.InRange(offDiagonal, random - 1, random);
            // Causal rows sample only blocks ≤ row; a row with fewer candidates than samples takes all of them.
            int candidates = r + 1, samples = Math.Min(random, candidates);
            int behind = Enumerable.Range(0, r).Count(c => uni[r, c]);
            Assert.InRange(behind, samples - 1, Math.Min(samples, r));
            Assert.All(Enumerable.Range(r + 1, nb - r - 1), c => Assert.False(uni[r, c]));
        }
    }

    [Fact]
    public void VariableCausalSamplesRandomBlocksFromAllBlocksLikeDeepSpeed()
    {
        // DeepSpeed's VariableSparsityConfig samples from every block even when unidirectional; such
        // blocks stay in the layout but the token-level rule key ≤ query removes them.
        const int nb = 8;
        var p = new DsVariablePattern(B, true, 3, [1], [], seed: 2);
        var layout = p.Layout(0, nb);
        int above = Enumerable.Range(0, nb).Sum(r => Enumerable.Range(r + 1, nb - r - 1).Count(c => layout[r, c]));
        Assert.True(above > 0, "expected some random blocks above the diagonal");
        Assert.All(Enumerable.Range(0, nb), r => Assert.InRange(Enumerable.Range(0, nb).Count(c => c != r && layout[r, c]), 2, 3));
        using var dense = p.Compile(nb * B, B, 1).ToDense();
        Assert.False(dense.triu(1).any().item<bool>());
    }

    [Fact]
    public void RandomLayoutsAreReproducibleAndSeedDependent()
    {
        const int nb = 12;
        Assert.Equal(Show(new BigBirdPattern(B, false, 2, seed: 1).Layout(0, nb)), Show(new BigBirdPattern(B, false, 2, seed: 1).Layout(0, nb)));
        Assert.NotEqual(Show(new BigBirdPattern(B, false, 2, seed: 1).Layout(0, nb)), Show(new BigBirdPattern(B, false, 2, seed: 2).Layout(0, nb)));
        Assert.Equal(Show(new DsVariablePattern(B, true, 2, seed: 9).Layout(0, nb)), Show(new DsVariablePattern(B, true, 2, seed: 9).Layout(0, nb)));
        Assert.NotEqual(Show(new DsVariablePattern(B, true, 2, seed: 9).Layout(0, nb)), Show(new DsVariablePattern(B, true, 2, seed: 10).Layout(0, nb)));
        // The cache hands out copies: changing one does not change the next.
        var p = new BigBirdPattern(B, false, 2, seed: 1);
        var first = p.Layout(0, nb);
        string before = Show(first);
        first[0, nb - 1] = !first[0, nb - 1];
        Assert.Equal(before, Show(p.Layout(0, nb)));
    }

    [Fact]
    public void DifferentLayoutPerHeadControlsRandomBlocks()
    {
        const int nb = 12;
        var shared = new BigBirdPattern(B, false, 2, seed: 4);
        var perHead = new BigBirdPattern(B, false, 2, differentLayoutPerHead: true, seed: 4);
        Assert.True(shared.SameForAllHeads);
        Assert.False(perHead.SameForAllHeads);
        for (int h = 1; h < 4; h++)
        {
            Assert.Equal(Show(shared.Layout(0, nb)), Show(shared.Layout(h, nb)));
            Assert.NotEqual(Show(perHead.Layout(0, nb)), Show(perHead.Layout(h, nb)));
        }
        var variable = new DsVariablePattern(B, false, 1, differentLayoutPerHead: true, seed: 4);
        Assert.NotEqual(Show(variable.Layout(0, nb)), Show(variable.Layout(1, nb)));
        // Nothing random and one global pattern: per-head layouts are all the same.
        Assert.True(new DsVariablePattern(B, false, 0, differentLayoutPerHead: true).SameForAllHeads);
        Assert.True(new LongformerPattern(B, false, differentLayoutPerHead: true).SameForAllHeads);
        Assert.True(new DsFixedPattern(B, false, differentLayoutPerHead: true).SameForAllHeads);
        Assert.False(new DsFixedPattern(B, false, numDifferentGlobalPatterns: 2, differentLayoutPerHead: true).SameForAllHeads);
    }

    // ---------- token level: compile with equal and different block sizes ----------

    /// Layout (H, nb, nb) expanded to tokens with repeat_interleave, cut to T, and tril when causal.
    private static Tensor TokenExpectation(bool[][,] layouts, int block, int seqLen, bool causal)
    {
        int nb = layouts[0].GetLength(0);
        var flat = layouts.SelectMany(l => l.Cast<bool>()).ToArray();
        using var blocks = tensor(flat, new long[] { layouts.Length, nb, nb });
        var tokens = blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)[.., ..seqLen, ..seqLen];
        return causal ? tokens.logical_and(ones(seqLen, seqLen, ScalarType.Bool).tril()) : tokens;
    }

    [Theory]
    [MemberData(nameof(KindsAndCausal))]
    public void CompiledMaskMatchesTokenExpectation(string kind, bool causal)
    {
        const int heads = 3;
        var c = Make(kind, causal);
        foreach (int seqLen in new[] { 4 * B, 22, 37 })
        {
            int nb = (seqLen + B - 1) / B;
            // Random kinds: the oracle is the library's layout only after it passed the rule checks here.
            var layouts = Enumerable.Range(0, heads).Select(h =>
            {
                if (c.Expected is not null) return c.Expected(h, nb);
                var layout = c.Pattern.Layout(h, nb);
                AssertRandomRules(c, layout, $"{c.Pattern.Name} head {h}");
                return layout;
            }).ToArray();
            using var expected = TokenExpectation(layouts, B, seqLen, causal);
            foreach (int compileBlock in new[] { B, 3, 8 })
            {
                var mask = c.Pattern.Compile(seqLen, compileBlock, heads);
                using var dense = mask.ToDense();
                Assert.Equal(expected.shape, dense.shape);
                Assert.True(dense.eq(expected).all().item<bool>(), $"{c.Pattern.Name}: seqLen {seqLen}, compile block {compileBlock}");
                Assert.Equal(causal, mask.IsCausal);
            }
        }
    }

    [Fact]
    public void CandidateKeyBlocksAreExactWhenBlocksMatch()
    {
        // Same block size: candidates = visited layout columns (clipped to ≤ row when causal).
        var p = new BigBirdPattern(B, true, 2, 3, 1, seed: 6);
        const int seqLen = 9 * B - 1, nb = 9;
        var layout = p.Layout(0, nb);
        for (int qb = 0; qb < nb; qb++)
            Assert.Equal(Enumerable.Range(0, qb + 1).Where(kb => layout[qb, kb]), p.CandidateKeyBlocks(0, qb, B, seqLen));
    }

    // ---------- names and validation ----------

    [Fact]
    public void NamesDescribeTheConfiguration()
    {
        Assert.Equal("bigbird(block=16, random=1, window=3, global=1, causal)", new BigBirdPattern(16, true).Name);
        Assert.Equal("sliding_window(block=16, window=3)", new SlidingWindowPattern(16, false).Name);
        Assert.Equal("longformer(block=8, window=3, global=[0:2, 5:6], per_head)",
            new LongformerPattern(8, false, 3, [0, 5], [2, 6], differentLayoutPerHead: true).Name);
        Assert.Equal("ds_fixed(block=16, local=4, global=1, horizontal)", new DsFixedPattern(16, false, horizontalGlobalAttention: true).Name);
        Assert.Equal("ds_variable(block=16, random=2, windows=[4], global=[0], seed=3, causal)", new DsVariablePattern(16, true, 2, seed: 3).Name);
    }

    private static void Throws(string param, Action action) =>
        Assert.Equal(param, Assert.Throws<ArgumentException>(action).ParamName);

    [Fact]
    public void ConstructorRejectsBadArguments()
    {
        Throws("block", () => new DsFixedPattern(0, false));
        Throws("block", () => new DsVariablePattern(-1, false));
        Throws("block", () => new BigBirdPattern(0, true));
        Throws("block", () => new LongformerPattern(0, true));
        Throws("block", () => new SlidingWindowPattern(0, true));

        Throws("numLocalBlocks", () => new DsFixedPattern(16, false, numLocalBlocks: 4, numGlobalBlocks: 3));
        Throws("numGlobalBlocks", () => new DsFixedPattern(16, false, numGlobalBlocks: 0));
        Throws("numDifferentGlobalPatterns", () => new DsFixedPattern(16, false, numDifferentGlobalPatterns: 2));
        Throws("numDifferentGlobalPatterns", () => new DsFixedPattern(16, false, 4, 2, numDifferentGlobalPatterns: 3, differentLayoutPerHead: true));
        Throws("horizontalGlobalAttention", () => new DsFixedPattern(16, true, horizontalGlobalAttention: true));

        Throws("horizontalGlobalAttention", () => new DsVariablePattern(16, true, horizontalGlobalAttention: true));
        Throws("globalBlockEndIndices", () => new DsVariablePattern(16, false, globalBlockIndices: [0, 4], globalBlockEndIndices: [2]));
        Throws("globalBlockEndIndices", () => new DsVariablePattern(16, false, globalBlockIndices: [0, 4], globalBlockEndIndices: [2, 4]));
        Throws("globalBlockIndices", () => new DsVariablePattern(16, false, globalBlockIndices: [-1]));
        Throws("localWindowBlocks", () => new DsVariablePattern(16, false, localWindowBlocks: []));
        Throws("localWindowBlocks", () => new DsVariablePattern(16, false, localWindowBlocks: [2, 0]));
        Throws("numRandomBlocks", () => new DsVariablePattern(16, false, numRandomBlocks: -1));

        Throws("numRandomBlocks", () => new BigBirdPattern(16, false, numRandomBlocks: -1));
        Throws("numSlidingWindowBlocks", () => new BigBirdPattern(16, false, numSlidingWindowBlocks: 0));
        Throws("numGlobalBlocks", () => new BigBirdPattern(16, false, numGlobalBlocks: -1));

        Throws("globalBlockEndIndices", () => new LongformerPattern(16, false, 3, [1, 2], [3]));
        Throws("globalBlockEndIndices", () => new LongformerPattern(16, false, 3, [3], [1]));
        Throws("numSlidingWindowBlocks", () => new SlidingWindowPattern(16, false, 0));
    }

    [Fact]
    public void ValidateRejectsCountsLargerThanTheNumberOfBlocks()
    {
        // seqLen 40, block 16 → 3 blocks (the last one short); equal to the block count is allowed.
        Throws("numRandomBlocks", () => new BigBirdPattern(16, false, numRandomBlocks: 4).Validate(40, 2));
        Throws("numSlidingWindowBlocks", () => new BigBirdPattern(16, false, numSlidingWindowBlocks: 4).Validate(40, 2));
        Throws("numGlobalBlocks", () => new BigBirdPattern(16, true, numGlobalBlocks: 4).Validate(40, 2));
        Throws("numRandomBlocks", () => new DsVariablePattern(16, false, numRandomBlocks: 4).Validate(40, 2));
        Throws("numSlidingWindowBlocks", () => new LongformerPattern(16, false, 5).Validate(40, 2));
        Throws("numSlidingWindowBlocks", () => new SlidingWindowPattern(16, true, 4).Validate(40, 2));
        // Compile validates first; Layout checks the block count it is given.
        Throws("numSlidingWindowBlocks", () => new SlidingWindowPattern(16, true, 4).Compile(40, 16, 1));
        Throws("numRandomBlocks", () => new BigBirdPattern(16, false, numRandomBlocks: 4).Layout(0, 3));
        var message = Assert.Throws<ArgumentException>(() => new BigBirdPattern(16, false, numRandomBlocks: 4).Validate(40, 2)).Message;
        Assert.Contains("40", message);
        Assert.Contains("got 4", message);

        new BigBirdPattern(16, false, 3, 3, 3).Validate(40, 2);
        new DsVariablePattern(16, false, 3).Validate(40, 2);
        new SlidingWindowPattern(16, false, 3).Validate(33, 1);
        new DsFixedPattern(16, false, 8, 4).Validate(16, 1);   // Fixed has no such limit (DeepSpeed raises nothing)
        Throws("seqLen", () => new DsFixedPattern(16, false).Validate(0, 1));
        Throws("heads", () => new DsFixedPattern(16, false).Validate(16, 0));
        Throws("head", () => new DsFixedPattern(16, false).Layout(-1, 4));
        Throws("numBlocks", () => new DsFixedPattern(16, false).Layout(0, 0));
    }

    /// <summary><c>AtLength</c>: a causal layout whose rows change with the length (random blocks seeded by the block count)
    /// is, at every shorter length, exactly the full-length layout's top-left corner — prefix-stable, as cached decoding
    /// needs — while the plain layout is not; compiled masks agree with the predicate; longer sequences are refused.</summary>
    [Fact]
    public void AtLengthCropsTheFullLengthLayoutToEveryShorterSequence()
    {
        var bigBird = new BigBirdPattern(B, causal: true, numRandomBlocks: 2, numSlidingWindowBlocks: 1, numGlobalBlocks: 1, seed: 3);
        const int full = 40;                                        // 10 blocks; shorter prompts would be refused by the plain layout
        Assert.False(bigBird.IsPrefixStable);
        var cropped = bigBird.AtLength(full);
        Assert.True(cropped.IsPrefixStable);
        Assert.True(cropped.IsCausal);
        bool anyDiffers = false;
        for (int len = 1; len <= full; len++)
        {
            for (int q = 0; q < len; q++)
                for (int k = 0; k < len; k++)
                {
                    bool expected = bigBird.Allows(0, q, k, full);
                    Assert.True(expected == cropped.Allows(0, q, k, len), $"len {len}, q {q}, k {k}");
                    if (len > 2 * B) anyDiffers |= bigBird.Allows(0, q, k, len) != expected;   // (the plain layout refuses < 3 blocks)
                }
            foreach (int blockSize in new[] { 1, 3, 4, 16 })
            {
                var mask = cropped.Compile(len, blockSize, heads: 1);
                for (int q = 0; q < len; q++)
                    for (int k = 0; k < len; k++)
                        Assert.True(mask.Allows(0, q, k) == bigBird.Allows(0, q, k, full), $"compiled: len {len}, block {blockSize}, q {q}, k {k}");
            }
        }
        Assert.True(anyDiffers, "the plain layout should change with the length, or this test shows nothing");
        var window = new WindowPattern(4, 1, 0, exactWindowSize: false, causal: true);
        Assert.Same(window, window.AtLength(full));                // already prefix-stable: unchanged
        var e = Assert.Throws<ArgumentException>(() => cropped.Validate(full + 1, 1));
        Assert.Equal("seqLen", e.ParamName);
    }
}
