using System.Buffers.Binary;
using System.Text.Json;
using SparseAttention.Cli;
using SparseAttention.Patterns;
using Xunit;

namespace SparseAttention.Tests;

/// <summary>Shared helpers: run the CLI in-process and check a JSON pattern against the library.</summary>
internal static class CliRunner
{
    public static (int Code, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = CliApp.Run(args, stdout, stderr);
        return (code, stdout.ToString(), stderr.ToString());
    }

    /// <summary>Checks the JSON document of <c>pattern --format json</c> against <paramref name="expected"/>,
    /// compiled independently here: header fields, the token mask (= ToDense), the layout (= Layout, and
    /// consistent with the mask) and the sparsity (= the mask's fraction of zeros).</summary>
    public static void AssertJsonMatches(string json, string kind, AttentionPattern expected, int seqLen, int block, int heads)
    {
        using var doc = JsonDocument.Parse(json);
        var root = doc.RootElement;
        Assert.Equal(["kind", "seq_len", "block", "heads", "causal", "sparsity", "layout", "mask"],
            root.EnumerateObject().Select(p => p.Name).ToArray());
        Assert.Equal(kind, root.GetProperty("kind").GetString());
        Assert.Equal(seqLen, root.GetProperty("seq_len").GetInt32());
        Assert.Equal(block, root.GetProperty("block").GetInt32());
        Assert.Equal(heads, root.GetProperty("heads").GetInt32());
        Assert.Equal(expected.IsCausal, root.GetProperty("causal").GetBoolean());

        var mask = expected.Compile(seqLen, block, heads);
        using var denseTensor = mask.ToDense();
        var dense = denseTensor.data<bool>().ToArray();   // (H, T, T)
        int numBlocks = (seqLen + block - 1) / block;

        var maskJson = root.GetProperty("mask");
        var layoutJson = root.GetProperty("layout");
        Assert.Equal(heads, maskJson.GetArrayLength());
        Assert.Equal(heads, layoutJson.GetArrayLength());
        long allowed = 0;
        for (int h = 0; h < heads; h++)
        {
            var fromMask = new bool[numBlocks, numBlocks];
            var rows = maskJson[h];
            Assert.Equal(seqLen, rows.GetArrayLength());
            for (int q = 0; q < seqLen; q++)
            {
                var row = rows[q];
                Assert.Equal(seqLen, row.GetArrayLength());
                for (int k = 0; k < seqLen; k++)
                {
                    int v = row[k].GetInt32();
                    Assert.True(v is 0 or 1, $"mask[{h}][{q}][{k}] = {v}");
                    Assert.True((v == 1) == dense[((long)h * seqLen + q) * seqLen + k], $"mask[{h}][{q}][{k}] differs from ToDense");
                    if (v == 1) { allowed++; fromMask[q / block, k / block] = true; }
                }
            }
            var layout = mask.Layout(h);
            Assert.Equal(numBlocks, layoutJson[h].GetArrayLength());
            for (int qb = 0; qb < numBlocks; qb++)
            {
                Assert.Equal(numBlocks, layoutJson[h][qb].GetArrayLength());
                for (int kb = 0; kb < numBlocks; kb++)
                {
                    bool visited = layoutJson[h][qb][kb].GetInt32() == 1;
                    Assert.Equal(layout[qb, kb], visited);
                    Assert.Equal(fromMask[qb, kb], visited);   // a block is visited iff it holds an allowed pair
                }
            }
        }
        double sparsity = root.GetProperty("sparsity").GetDouble();
        Assert.Equal(1 - (double)allowed / ((long)heads * seqLen * seqLen), sparsity, 12);
        Assert.Equal(mask.Sparsity, sparsity, 12);
    }
}

public class CliPatternTests
{
    private static (int Code, string Out, string Err) Run(params string[] args) => CliRunner.Run(args);

    private static void AssertUsageError((int Code, string Out, string Err) r, params string[] mentions)
    {
        Assert.NotEqual(0, r.Code);
        string err = r.Err.TrimEnd();
        Assert.StartsWith("error: ", err);
        Assert.DoesNotContain("\n", err);                // one line
        Assert.DoesNotContain("   at ", err);            // no stack trace
        foreach (var m in mentions) Assert.Contains(m, err);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public void AsciiFixed_PrintsOneRowPerQueryBlockForEveryHead(int heads)
    {
        var r = Run("pattern", "--kind", "fixed", "--seq-len", "64", "--block", "8", "--heads", $"{heads}", "--format", "ascii");
        Assert.Equal(0, r.Code);
        Assert.Equal("", r.Err);

        var expected = new FixedPattern(8, 1, 1, causal: true).Compile(64, 8, heads);   // --stride defaults to --block
        var lines = r.Out.Split('\n').Select(l => l.TrimEnd('\r')).ToList();
        for (int h = 0; h < heads; h++)
        {
            int at = lines.IndexOf($"head {h}:");
            Assert.True(at >= 0, $"no 'head {h}:' line in:\n{r.Out}");
            var layout = expected.Layout(h);
            for (int qb = 0; qb < 8; qb++)
            {
                string row = lines[at + 1 + qb].Trim();
                Assert.Equal(8, row.Length);
                for (int kb = 0; kb < 8; kb++)
                {
                    Assert.Contains(row[kb], "█▒·");
                    Assert.Equal(layout[qb, kb], row[kb] != '·');
                }
            }
            Assert.False(at + 9 < lines.Count && lines[at + 9].StartsWith("  ") && lines[at + 9].Trim().Length == 8, "more than 8 rows");
        }
        Assert.Equal(heads, lines.Count(l => l.StartsWith("head ")));
    }

    [Fact]
    public void PngFixed_WritesAValidPngAtomically()
    {
        string dir = Directory.CreateTempSubdirectory("sparse-attn-cli-").FullName;
        try
        {
            string path = Path.Combine(dir, "f.png");
            var r = Run("pattern", "--kind", "fixed", "--seq-len", "64", "--block", "8", "--heads", "2", "--format", "png", "--out", path);
            Assert.Equal(0, r.Code);
            Assert.Equal("", r.Err);
            Assert.False(File.Exists(path + ".tmp"));

            byte[] png = File.ReadAllBytes(path);
            Assert.Equal(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A }, png[..8]);
            Assert.Equal("IHDR", System.Text.Encoding.ASCII.GetString(png, 12, 4));
            int width = BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(16)), height = BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(20));
            Assert.InRange(width, 400, 4000);
            Assert.InRange(height, 300, 4000);

            using var decoded = SkiaSharp.SKBitmap.Decode(path);
            Assert.NotNull(decoded);
            Assert.Equal((width, height), (decoded.Width, decoded.Height));
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    public static TheoryData<string[], string, AttentionPattern, int, int, int> JsonCases => new()
    {
        { ["--kind", "fixed", "--seq-len", "64", "--block", "8", "--stride", "16", "--vertsize", "2", "--num-verts", "2", "--heads", "2"],
            "fixed", new FixedPattern(16, 2, 2, causal: true), 64, 8, 2 },
        { ["--kind", "fixed", "--seq-len", "40", "--block", "8", "--stride", "8", "--combine", "multihead", "--heads", "2", "--bidirectional"],
            "fixed", new FixedPattern(8, 1, 1, causal: false, FactorizedCombine.MultiHead), 40, 8, 2 },
        { ["--kind", "all", "--seq-len", "20", "--block", "8"], "all", new DensePattern(causal: true), 20, 8, 1 },
        { ["--kind", "local", "--local-attn-ctx", "5", "--seq-len", "30", "--block", "8", "--bidirectional"],
            "local", new LocalBandPattern(5, causal: false), 30, 8, 1 },
        { ["--kind", "window", "--window-size", "6", "--look-backward", "1", "--look-forward", "1", "--exact-windowsize", "--bidirectional", "--seq-len", "29", "--block", "4"],
            "window", new WindowPattern(6, 1, 1, exactWindowSize: true, causal: false), 29, 4, 1 },
        { ["--kind", "strided", "--stride", "5", "--combine", "interleaved", "--layer", "1", "--seq-len", "33", "--block", "8"],
            "strided", new StridedPattern(5, causal: true, FactorizedCombine.Interleaved, layer: 1), 33, 8, 1 },
    };

    [Theory]
    [MemberData(nameof(JsonCases))]
    public void Json_MatchesLibraryPatternOracle_MaskLayoutAndSparsityAgree(string[] options, string kind, AttentionPattern expected, int seqLen, int block, int heads)
    {
        var r = Run(["pattern", .. options, "--format", "json"]);
        Assert.Equal(0, r.Code);
        Assert.Equal("", r.Err);
        CliRunner.AssertJsonMatches(r.Out, kind, expected, seqLen, block, heads);
    }

    [Fact]
    public void Json_ToFile_WritesTheSameDocumentAtomically()
    {
        string dir = Directory.CreateTempSubdirectory("sparse-attn-cli-").FullName;
        try
        {
            string path = Path.Combine(dir, "sub", "p.json");
            string[] args = ["pattern", "--kind", "strided", "--stride", "4", "--seq-len", "24", "--block", "8", "--format", "json"];
            var toStdout = Run(args);
            var toFile = Run([.. args, "--out", path]);
            Assert.Equal(0, toFile.Code);
            Assert.Equal(toStdout.Out, File.ReadAllText(path));
            Assert.False(File.Exists(path + ".tmp"));
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public void UnknownKind_FailsAndListsTheKinds()
    {
        var r = Run("pattern", "--kind", "banana", "--seq-len", "64");
        AssertUsageError(r, "--kind", "banana", "fixed", "bigbird", "sliding-window");
    }

    [Fact]
    public void BlockZero_Fails()
    {
        var r = Run("pattern", "--kind", "fixed", "--seq-len", "64", "--block", "0");
        AssertUsageError(r, "--block", "0");
    }

    [Fact]
    public void LocalCtxLongerThanSequence_FailsNamingTheOption()
    {
        var r = Run("pattern", "--kind", "local", "--local-attn-ctx", "100", "--seq-len", "64", "--block", "8");
        AssertUsageError(r, "--local-attn-ctx", "--seq-len", "64", "100");
    }

    [Fact]
    public void WindowLongerThanSequence_FailsNamingTheOption()
    {
        var r = Run("pattern", "--kind", "window", "--window-size", "65", "--seq-len", "64");
        AssertUsageError(r, "--window-size");
    }

    [Fact]
    public void BadCombine_Fails()
    {
        var r = Run("pattern", "--kind", "strided", "--stride", "4", "--combine", "sideways");
        AssertUsageError(r, "--combine", "sideways", "merged", "multihead");
    }

    [Fact]
    public void LibraryArgumentError_NamesTheOption()
    {
        // FixedPattern rejects num_verts · vertsize > stride; the message is mapped to --num-verts.
        var r = Run("pattern", "--kind", "fixed", "--stride", "4", "--vertsize", "2", "--num-verts", "3", "--seq-len", "32");
        AssertUsageError(r, "--num-verts");
        // WindowPattern rejects looking forward when causal.
        AssertUsageError(Run("pattern", "--kind", "window", "--window-size", "4", "--look-forward", "1", "--seq-len", "32"), "--look-forward");
    }

    [Fact]
    public void ParserErrors_AreOneLineNamingTheOption()
    {
        AssertUsageError(Run("pattern", "--kind", "fixed", "--seq-len", "many"), "--seq-len", "many");
        AssertUsageError(Run("pattern", "--seq-len", "64"), "--kind");
        AssertUsageError(Run("pattern", "--kind", "local", "--stride", "4"), "--stride", "--kind local", "--local-attn-ctx");
        AssertUsageError(Run("pattern", "--kind", "all", "--causal", "--bidirectional"), "--causal", "--bidirectional");
        AssertUsageError(Run("pattern", "--kind", "all", "--format", "gif"), "--format", "gif", "png");
        AssertUsageError(Run("pattern", "--kind", "all", "--format", "png"), "--out");
        AssertUsageError(Run("pattern", "--kind", "ds-variable", "--local-window-blocks", "4,x"), "--local-window-blocks", "'x'");
    }

    [Fact]
    public void Help_GoesToStdout()
    {
        var r = Run("pattern", "--help");
        Assert.Equal(0, r.Code);
        Assert.Contains("--kind", r.Out);
        Assert.Contains("--local-window-blocks", r.Out);
        Assert.Equal("", r.Err);
    }
}

/// <summary>The block-layout kinds (ds-fixed, ds-variable, bigbird, longformer, sliding-window) against the library classes.
/// Oracle: the library pattern compiled in the test; those classes are themselves checked against independently
/// written layouts and rules in BlockLayoutTests, so these tests check the CLI's option plumbing and JSON.</summary>
public class CliBlockLayoutPatternTests
{
    public static TheoryData<string[], string, string> Cases => new()
    {
        { ["--num-local-blocks", "2", "--num-global-blocks", "1", "--num-different-global-patterns", "2", "--different-layout-per-head", "--heads", "2"], "ds-fixed", "causal" },
        { ["--num-local-blocks", "2", "--horizontal-global-attention", "--bidirectional"], "ds-fixed", "bidirectional" },
        { ["--num-random-blocks", "1", "--local-window-blocks", "1,2", "--global-block-indices", "0", "--seed", "3"], "ds-variable", "causal" },
        { ["--local-window-blocks", "2", "--global-block-indices", "0,4", "--global-block-end-indices", "1,5", "--bidirectional"], "ds-variable", "ranges" },
        { ["--num-random-blocks", "1", "--num-sliding-window-blocks", "3", "--num-global-blocks", "1", "--seed", "1", "--bidirectional"], "bigbird", "bidirectional" },
        { ["--num-sliding-window-blocks", "3", "--global-block-indices", "0", "--bidirectional"], "longformer", "bidirectional" },
        { ["--num-sliding-window-blocks", "3"], "sliding-window", "causal" },
    };

    private static AttentionPattern Expected(string kind, string variant, int block) => (kind, variant) switch
    {
        ("ds-fixed", "causal") => new DsFixedPattern(block, true, numLocalBlocks: 2, numGlobalBlocks: 1, numDifferentGlobalPatterns: 2, differentLayoutPerHead: true),
        ("ds-fixed", _) => new DsFixedPattern(block, false, numLocalBlocks: 2, horizontalGlobalAttention: true),
        ("ds-variable", "causal") => new DsVariablePattern(block, true, numRandomBlocks: 1, localWindowBlocks: [1, 2], globalBlockIndices: [0], seed: 3),
        ("ds-variable", _) => new DsVariablePattern(block, false, localWindowBlocks: [2], globalBlockIndices: [0, 4], globalBlockEndIndices: [1, 5]),
        ("bigbird", _) => new BigBirdPattern(block, false, numRandomBlocks: 1, numSlidingWindowBlocks: 3, numGlobalBlocks: 1, seed: 1),
        ("longformer", _) => new LongformerPattern(block, false, numSlidingWindowBlocks: 3, globalBlockIndices: [0]),
        _ => new SlidingWindowPattern(block, true, numSlidingWindowBlocks: 3),
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void Json_MatchesLibraryPatternOracle(string[] options, string kind, string variant)
    {
        const int seqLen = 64, block = 8;
        int heads = options.Contains("--heads") ? int.Parse(options[Array.IndexOf(options, "--heads") + 1]) : 1;
        var r = CliRunner.Run(["pattern", "--kind", kind, "--seq-len", $"{seqLen}", "--block", $"{block}", .. options, "--format", "json"]);
        Assert.True(r.Code == 0, r.Err);
        CliRunner.AssertJsonMatches(r.Out, kind, Expected(kind, variant, block), seqLen, block, heads);
    }

    [Fact]
    public void Ascii_DrawsEveryKind()
    {
        foreach (var kind in new[] { "ds-fixed", "ds-variable", "bigbird", "longformer", "sliding-window" })
        {
            var r = CliRunner.Run("pattern", "--kind", kind, "--seq-len", "64", "--block", "8", "--bidirectional");
            Assert.True(r.Code == 0, $"{kind}: {r.Err}");
            Assert.Contains("head 0:", r.Out);
        }
    }
}
