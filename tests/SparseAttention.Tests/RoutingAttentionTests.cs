using SparseAttention.Clustering;
using SparseAttention.Modules;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class RoutingAttentionTests
{
    private const int Heads = 2, Dim = 4, MaxSeqLen = 16, Window = 4;

    private static RoutingAttention Make(bool causal, bool sharedQk, int memKv, long seed = 3, double commitment = 1e-4)
    {
        var module = new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal, sharedQk, memKv, commitmentFactor: commitment, seed: seed);
        module.to(ScalarType.Float64);
        return module;
    }

    private static (Tensor Q, Tensor? K, Tensor V) Inputs(long seed, long batch, long seqLen, bool sharedQk)
    {
        var gen = new Generator((ulong)seed);
        Tensor Make() => randn(new long[] { batch, Heads, seqLen, Dim }, dtype: ScalarType.Float64, generator: gen);
        var q = Make(); var k = Make(); var v = Make();
        return (q, sharedQk ? null : k, v);
    }

    /// <summary>One training forward on a full-length batch (initialises the centroids) and one EMA step.</summary>
    private static void WarmUp(RoutingAttention module)
    {
        var (q, k, v) = Inputs(1000, 3, MaxSeqLen, module.SharedQk);
        module.train();
        module.forward(q, k, v, null);
        module.KMeans.Update();
    }

    private static Tensor? PaddingMask(long batch, long seqLen, bool padded)
    {
        if (!padded) return null;
        var mask = ones(batch, seqLen, dtype: ScalarType.Bool);
        mask[0, Math.Min(2, seqLen - 1)] = tensor(false);
        if (batch > 1 && seqLen >= 5) mask[1, (int)(seqLen - 3)..] = tensor(false);
        return mask;
    }

    /// <summary>The memory rows of each group, looked up one by one from the module's parameters.</summary>
    private static (Tensor? Keys, Tensor? Values) MemoryOf(RoutingAttention module, Tensor groupClusters)
    {
        if (module.NumMemKv == 0) return (null, null);
        var p = module.named_parameters().ToDictionary(n => n.name, n => n.parameter);
        long batch = groupClusters.shape[0], groups = groupClusters.shape[2];
        Tensor Lookup(Tensor memory) => stack(Enumerable.Range(0, (int)batch).Select(b =>
            stack(Enumerable.Range(0, Heads).Select(h =>
                stack(Enumerable.Range(0, (int)groups).Select(g =>
                    memory[h, Math.Max(0, groupClusters[b, h, g].item<long>())]))))));       // (B, H, G, M, D)
        return (Lookup(p["mem_key"]), Lookup(p["mem_value"]));
    }

    /// <summary>Checks the returned memberships against the routing rules, recomputed from the centroids.</summary>
    private static void CheckRouting(RoutingAttention module, Tensor q, Tensor? k, Tensor? keyMask, RoutingAttentionOutput result)
    {
        long batch = q.shape[0], seqLen = q.shape[2];
        int window = (int)Math.Min(Window, seqLen), clusters = module.Clusters;
        var means = module.KMeans.Means.to(q.dtype);                                           // (H, C, D)
        var nq = nn.functional.normalize(q, 2, -1);
        var nk = module.SharedQk ? nq : nn.functional.normalize(k!, 2, -1);
        var simQ = einsum("bhtd,hcd->bhtc", nq, means).to(ScalarType.Float64).data<double>().ToArray();
        var simK = einsum("bhtd,hcd->bhtc", nk, means).to(ScalarType.Float64).data<double>().ToArray();
        var real = (keyMask ?? ones(batch, seqLen, dtype: ScalarType.Bool)).data<bool>().ToArray();
        var qIdx = result.QueryIndices.data<long>().ToArray();
        var kIdx = result.KeyIndices.data<long>().ToArray();
        var gc = result.GroupClusters.data<long>().ToArray();
        long groups = result.QueryIndices.shape[2], width = result.QueryIndices.shape[3];
        double Sim(double[] s, long b, long h, long t, long c) => s[((b * Heads + h) * seqLen + t) * clusters + c];
        string Slots(long[] idx, long b, long h, long g) =>
            string.Join(",", Enumerable.Range(0, (int)width).Select(s => idx[((b * Heads + h) * groups + g) * width + s]).Where(p => p >= 0).Order());

        for (long b = 0; b < batch; b++)
            for (long h = 0; h < Heads; h++)
            {
                var realPositions = Enumerable.Range(0, (int)seqLen).Select(t => (long)t).Where(t => real[b * seqLen + t]).ToList();
                if (!module.Causal)
                {
                    Assert.Equal(clusters, groups);
                    for (long c = 0; c < clusters; c++)
                    {
                        string Top(double[] s) => string.Join(",", realPositions.OrderByDescending(t => Sim(s, b, h, t, c)).Take(window).Order());
                        Assert.Equal(Top(simQ), Slots(qIdx, b, h, c));
                        Assert.Equal(Top(simK), Slots(kIdx, b, h, c));
                        Assert.Equal(c, gc[(b * Heads + h) * groups + c]);
                    }
                    continue;
                }
                long Nearest(double[] s, long t) => Enumerable.Range(0, clusters).MaxBy(c => Sim(s, b, h, t, c));
                var expected = new List<string>();
                for (long c = 0; c < clusters; c++)
                {
                    var members = realPositions.Where(t => Nearest(simQ, t) == c || Nearest(simK, t) == c).ToList();
                    for (int start = 0; start < members.Count; start += window)
                    {
                        var chunk = members.Skip(start).Take(window).ToList();
                        expected.Add($"{c}: q[{string.Join(",", chunk.Where(t => Nearest(simQ, t) == c))}] k[{string.Join(",", chunk.Where(t => Nearest(simK, t) == c))}]");
                    }
                }
                var actual = new List<string>();
                for (long g = 0; g < groups; g++)
                {
                    long cluster = gc[(b * Heads + h) * groups + g];
                    string qs = Slots(qIdx, b, h, g), ks = Slots(kIdx, b, h, g);
                    if (cluster < 0) { Assert.Equal("", qs + ks); continue; }
                    actual.Add($"{cluster}: q[{qs}] k[{ks}]");
                }
                Assert.Equal(expected.Order(), actual.Order());
            }
    }

    public static TheoryData<bool, bool, int, int, bool> Cases()
    {
        var data = new TheoryData<bool, bool, int, int, bool>();
        foreach (bool causal in new[] { false, true })
            foreach (bool sharedQk in new[] { false, true })
                foreach (int memKv in new[] { 0, 2 })
                    foreach (var (seqLen, padded) in new[] { (13, false), (13, true), (16, true), (3, false) })
                        data.Add(causal, sharedQk, memKv, seqLen, padded);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void EqualsOracleOnItsOwnMembershipsAndFollowsTheRoutingRule(bool causal, bool sharedQk, int memKv, int seqLen, bool padded)
    {
        const long batch = 2;
        var module = Make(causal, sharedQk, memKv);
        WarmUp(module);
        var (q, k, v) = Inputs(seqLen * 7 + memKv, batch, seqLen, sharedQk);
        var keyMask = PaddingMask(batch, seqLen, padded);
        var result = module.forward(q, k, v, keyMask);
        Assert.Equal(new long[] { batch, Heads, seqLen, Dim }, result.Output.shape);
        CheckRouting(module, q, k, keyMask, result);

        var joined = GroupedOracle.Membership(result.QueryIndices, seqLen).sum(2);              // (B, H, T)
        var real = (keyMask ?? ones(batch, seqLen, dtype: ScalarType.Bool)).unsqueeze(1).expand(batch, Heads, seqLen);
        if (causal) Assert.True(joined.eq(real.to(ScalarType.Int64)).all().item<bool>(), "causal: every real token in exactly one group");
        else if (seqLen == 13 && !padded)
        {
            Assert.True(joined.max().item<long>() >= 2, "some token in several clusters");
            Assert.True(joined.min().item<long>() == 0, "some token in none");
        }

        var (memK, memV) = MemoryOf(module, result.GroupClusters);
        var upstream = randn(result.Output.shape, dtype: ScalarType.Float64, generator: new Generator(5));
        var inputs = sharedQk ? new[] { q, v } : new[] { q, k!, v };
        Tensor Module(Tensor[] x) => module.forward(x[0], sharedQk ? null : x[1], x[^1], keyMask).Output;
        Tensor Oracle(Tensor[] x) => GroupedOracle.Attention(x[0], sharedQk ? nn.functional.normalize(x[0], 2, -1) : x[1], x[^1],
            result.QueryIndices, result.KeyIndices, causal, sharedQk, keyMask, memoryKeys: memK, memoryValues: memV);
        var expected = GroupedAttentionTests.Grad(Oracle, upstream, inputs);
        var actual = GroupedAttentionTests.Grad(Module, upstream, inputs);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        for (int n = 0; n < inputs.Length; n++) TestSupport.AssertClose(expected.Grads[n], actual.Grads[n], $"gradient {n}");
        var nowhere = joined.eq(0).unsqueeze(-1).expand_as(actual.Output);
        Assert.Equal(0.0, actual.Output.masked_select(nowhere).abs().sum().item<double>());
    }

    /// <summary>One training cross forward on full-length queries and 9 context tokens (initialises the centroids).</summary>
    private static void WarmUpCross(RoutingAttention module, int contextWindow)
    {
        var (wq, wk, wv) = Inputs(2000, 3, MaxSeqLen, sharedQk: false);
        module.train();
        module.CrossForward(wq, wk!.narrow(2, 0, 9), wv.narrow(2, 0, 9), null, null, contextWindow);
    }

    /// <summary>Float64 queries (B, H, T, D), context keys and values (B, H, S, D) and, when padded, both masks.</summary>
    private static (Tensor Q, Tensor K, Tensor V, Tensor? QueryMask, Tensor? ContextMask) CrossInputs(ulong seed, long batch, int seqLen, int ctxLen, bool padded)
    {
        var gen = new Generator(seed);
        Tensor Rand(long length) => randn(new long[] { batch, Heads, length, Dim }, dtype: ScalarType.Float64, generator: gen);
        var (q, k, v) = (Rand(seqLen), Rand(ctxLen), Rand(ctxLen));
        return (q, k, v, PaddingMask(batch, seqLen, padded), PaddingMask(batch, ctxLen, padded));
    }

    public static TheoryData<bool, int, int, bool> CrossCases()
    {
        var data = new TheoryData<bool, int, int, bool>();
        foreach (bool causal in new[] { false, true })
            foreach (var (seqLen, ctxLen, padded) in new[] { (13, 7, false), (13, 7, true), (16, 20, true), (1, 5, false), (3, 2, false) })
                data.Add(causal, seqLen, ctxLen, padded);
        return data;
    }

    [Theory]
    [MemberData(nameof(CrossCases))]
    public void CrossAttentionEqualsOracleOnItsOwnMembershipsAndFollowsTheRoutingRule(bool causal, int seqLen, int ctxLen, bool padded)
    {
        const long batch = 2;
        const int contextWindow = 3;
        var module = Make(causal, sharedQk: false, memKv: 0);
        WarmUpCross(module, contextWindow);
        module.KMeans.Update();
        var (q, k, v, queryMask, contextMask) = CrossInputs((ulong)(seqLen * 31 + ctxLen), batch, seqLen, ctxLen, padded);
        var result = module.CrossForward(q, k, v, queryMask, contextMask, contextWindow);
        Assert.Equal(new long[] { batch, Heads, seqLen, Dim }, result.Output.shape);

        // The rule, recomputed from the centroids: context keys = each cluster's top real context tokens; queries =
        // each cluster's top real queries (not causal) or nearest-centroid members chunked by position (causal).
        var means = module.KMeans.Means.to(q.dtype);                                           // (H, C, D)
        var simQ = einsum("bhtd,hcd->bhtc", nn.functional.normalize(q, 2, -1), means);         // (B, H, T, C)
        var simK = einsum("bhtd,hcd->bhtc", nn.functional.normalize(k, 2, -1), means);         // (B, H, S, C)
        var realQ = (queryMask ?? ones(batch, seqLen, dtype: ScalarType.Bool)).data<bool>().ToArray();
        var realK = (contextMask ?? ones(batch, ctxLen, dtype: ScalarType.Bool)).data<bool>().ToArray();
        long groups = result.QueryIndices.shape[2];
        string Slots(Tensor idx, long b, long h, long g) => string.Join(",", idx[b, h, g].data<long>().ToArray().Where(p => p >= 0).Order());
        for (long b = 0; b < batch; b++)
            for (long h = 0; h < Heads; h++)
            {
                var queries = Enumerable.Range(0, seqLen).Where(t => realQ[b * seqLen + t]).ToList();
                var contexts = Enumerable.Range(0, ctxLen).Where(t => realK[b * ctxLen + t]).ToList();
                string TopContext(long c) => string.Join(",", contexts.OrderByDescending(t => simK[b, h, t, c].item<double>()).Take(contextWindow).Order());
                if (!causal)
                {
                    Assert.Equal(module.Clusters, groups);
                    for (long c = 0; c < module.Clusters; c++)
                    {
                        Assert.Equal(string.Join(",", queries.OrderByDescending(t => simQ[b, h, t, c].item<double>()).Take(Math.Min(Window, seqLen)).Order()), Slots(result.QueryIndices, b, h, c));
                        Assert.Equal(TopContext(c), Slots(result.KeyIndices, b, h, c));
                    }
                    continue;
                }
                var expected = new List<string>();
                for (long c = 0; c < module.Clusters; c++)
                {
                    var members = queries.Where(t => simQ[b, h, t].argmax().item<long>() == c).ToList();
                    for (int start = 0; start < members.Count; start += Math.Min(Window, seqLen))
                        expected.Add($"{c}: q[{string.Join(",", members.Skip(start).Take(Math.Min(Window, seqLen)))}] k[{TopContext(c)}]");
                }
                var actual = new List<string>();
                for (long g = 0; g < groups; g++)
                {
                    long cluster = result.GroupClusters[b, h, g].item<long>();
                    if (cluster < 0) { Assert.Equal("", Slots(result.QueryIndices, b, h, g) + Slots(result.KeyIndices, b, h, g)); continue; }
                    actual.Add($"{cluster}: q[{Slots(result.QueryIndices, b, h, g)}] k[{Slots(result.KeyIndices, b, h, g)}]");
                }
                Assert.Equal(expected.Order(), actual.Order());
            }

        // Output and gradients equal the oracle run on the memberships the module chose.
        var upstream = randn(result.Output.shape, dtype: ScalarType.Float64, generator: new Generator(6));
        Tensor Module(Tensor[] x) => module.CrossForward(x[0], x[1], x[2], queryMask, contextMask, contextWindow).Output;
        Tensor Oracle(Tensor[] x) => GroupedOracle.Attention(x[0], x[1], x[2], result.QueryIndices, result.KeyIndices,
            causal: false, sharedQk: false, contextMask);
        var expectedGrad = GroupedAttentionTests.Grad(Oracle, upstream, q, k, v);
        var actualGrad = GroupedAttentionTests.Grad(Module, upstream, q, k, v);
        TestSupport.AssertClose(expectedGrad.Output, actualGrad.Output, "output");
        for (int n = 0; n < 3; n++) TestSupport.AssertClose(expectedGrad.Grads[n], actualGrad.Grads[n], $"gradient {n}");
    }

    [Fact]
    public void CrossAttentionRejectsBadArguments()
    {
        var module = Make(causal: true, sharedQk: false, memKv: 0);
        var (q, k, v) = Inputs(1, 1, 5, sharedQk: false);
        Assert.Equal("contextWindowSize", Assert.ThrowsAny<ArgumentException>(() => module.CrossForward(q, k!, v, null, null, 0)).ParamName);
        Assert.Equal("v", Assert.ThrowsAny<ArgumentException>(() => module.CrossForward(q, k!, v.narrow(2, 0, 4), null, null, 2)).ParamName);
        Assert.Equal("sharedQk", Assert.ThrowsAny<ArgumentException>(() => Make(true, sharedQk: true, memKv: 0).CrossForward(q, k!, v, null, null, 2)).ParamName);
    }

    [Theory]
    [InlineData(16, 20, false, KMeansNorm.L2)]
    [InlineData(13, 7, true, KMeansNorm.LayerNorm)]
    [InlineData(3, 2, true, KMeansNorm.L2)]
    public void CrossStepsEqualTheCausalCrossForwardQueryByQuery(int seqLen, int ctxLen, bool padded, KMeansNorm norm)
    {
        // Incremental routing cross-attention: the context's per-cluster keys once, then each query alone attends its
        // nearest cluster's keys — the full forward's output at every real query, whatever chunk it fell in.
        const long batch = 2;
        const int contextWindow = 3;
        var module = new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal: true, norm: norm, seed: 3);
        module.to(ScalarType.Float64);
        WarmUpCross(module, contextWindow);
        module.eval();
        var (q, k, v, queryMask, contextMask) = CrossInputs((ulong)(seqLen * 17 + ctxLen), batch, seqLen, ctxLen, padded);
        var full = module.CrossForward(q, k, v, queryMask, contextMask, contextWindow);
        var groups = module.CrossContextGroups(k, contextMask, contextWindow);                   // (B, H, C, Wc)
        Assert.Equal(new long[] { batch, Heads, module.Clusters, Math.Min(contextWindow, ctxLen) }, groups.shape);
        var realQ = (queryMask ?? ones(batch, seqLen, dtype: ScalarType.Bool)).data<bool>().ToArray();
        for (int t = 0; t < seqLen; t++)
        {
            var step = module.CrossStep(q.narrow(2, t, 1), k, v, groups, contextMask);            // (B, H, 1, D)
            for (long b = 0; b < batch; b++)
                if (realQ[b * seqLen + t])
                    TestSupport.AssertClose(full.Output[b, .., t], step[b, .., 0], $"row {b}, query {t}");
        }
        if (seqLen < 16) return;
        // Meaningful: the queries use several clusters, some cluster holds two chunks, a cluster's keys are a strict subset.
        long g = full.GroupClusters.shape[2];
        var rows = full.GroupClusters.data<long>().ToArray().Chunk((int)g).Select(r => r.Where(c => c >= 0).ToArray()).ToArray();   // per (b, h)
        Assert.True(rows.All(r => r.Distinct().Count() > 1), "every query of a row chose one cluster");
        Assert.True(rows.Any(r => r.GroupBy(c => c).Any(x => x.Count() > 1)), "no cluster holds two chunks of queries");
        Assert.True(contextWindow < ctxLen);
        Assert.Equal("training", Assert.ThrowsAny<ArgumentException>(() => { module.train(); module.CrossContextGroups(k, null, 2); }).ParamName);
        Assert.Equal("causal", Assert.ThrowsAny<ArgumentException>(() => Make(false, sharedQk: false, memKv: 0).CrossContextGroups(k, null, 2)).ParamName);
    }

    public static TheoryData<bool, int, bool> LookBackCases()
    {
        var data = new TheoryData<bool, int, bool>();
        foreach (bool sharedQk in new[] { false, true })
            foreach (var (seqLen, padded) in new[] { (16, false), (13, true), (1, false) })
                data.Add(sharedQk, seqLen, padded);
        return data;
    }

    [Theory]
    [MemberData(nameof(LookBackCases))]
    public void CausalLookBackEqualsOracleWithThePreviousChunkOfTheSameCluster(bool sharedQk, int seqLen, bool padded)
    {
        const long batch = 2;
        var module = new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal: true, sharedQk, seed: 3, lookBackward: true);
        module.to(ScalarType.Float64);
        WarmUp(module);
        var (q, k, v) = Inputs(seqLen * 5 + 1, batch, seqLen, sharedQk);
        var keyMask = PaddingMask(batch, seqLen, padded);
        var result = module.forward(q, k, v, keyMask);

        // The dense mask the memberships imply, built here: a query attends the key slots of its own group and of the
        // group before it when that group holds the previous chunk of the same cluster; causal; real keys only; with
        // shared QK itself only when nothing else is allowed.
        var real = (keyMask ?? ones(batch, seqLen, dtype: ScalarType.Bool)).data<bool>().ToArray();
        var allowed = zeros(new long[] { batch, Heads, seqLen, seqLen }, dtype: ScalarType.Bool);
        long groups = result.QueryIndices.shape[2], pairsWithLookBack = 0, pairsWithout = 0;
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < Heads; h++)
            {
                var qi = result.QueryIndices[b, h].data<long>().ToArray();
                var ki = result.KeyIndices[b, h].data<long>().ToArray();
                var gc = result.GroupClusters[b, h].data<long>().ToArray();
                long width = result.QueryIndices.shape[3];
                var mask = new bool[seqLen, seqLen];
                for (long g = 0; g < groups; g++)
                {
                    bool back = g > 0 && gc[g] >= 0 && gc[g - 1] == gc[g];
                    var keys = Enumerable.Range(0, (int)width).Select(s => ki[g * width + s])
                        .Concat(back ? Enumerable.Range(0, (int)width).Select(s => ki[(g - 1) * width + s]) : []).Where(j => j >= 0).ToList();
                    foreach (long i in Enumerable.Range(0, (int)width).Select(s => qi[g * width + s]).Where(i => i >= 0))
                    {
                        var ok = keys.Where(j => j <= i && real[b * seqLen + j]).ToList();
                        if (sharedQk) ok = ok.Any(j => j != i) ? ok.Where(j => j != i).ToList() : ok;
                        foreach (long j in ok) mask[i, j] = true;
                        pairsWithLookBack += ok.Count;
                        pairsWithout += keys.Take((int)width).Count(j => j <= i && real[b * seqLen + j] && !(sharedQk && j == i));
                    }
                }
                for (int i = 0; i < seqLen; i++)
                    for (int j = 0; j < seqLen; j++)
                        if (mask[i, j]) allowed[b, h, i, j] = tensor(true);
            }
        if (seqLen == 16) Assert.True(pairsWithLookBack > pairsWithout, "no group looked back: the case does not exercise look-back");

        var keysUsed = sharedQk ? module.KMeans.Normalize(q) : k!;
        var upstream = randn(result.Output.shape, dtype: ScalarType.Float64, generator: new Generator(8));
        var inputs = sharedQk ? new[] { q, v } : new[] { q, k!, v };
        Tensor Module(Tensor[] x) => module.forward(x[0], sharedQk ? null : x[1], x[^1], keyMask).Output;
        Tensor Oracle(Tensor[] x) => Kernels.ReferenceAttention.Attention(x[0], sharedQk ? module.KMeans.Normalize(x[0]) : x[1], x[^1], mask: allowed, keyMask: keyMask);
        var expected = GroupedAttentionTests.Grad(Oracle, upstream, inputs);
        var actual = GroupedAttentionTests.Grad(Module, upstream, inputs);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        for (int n = 0; n < inputs.Length; n++) TestSupport.AssertClose(expected.Grads[n], actual.Grads[n], $"gradient {n}");

        // Causal: perturbing every token after t leaves the outputs up to t unchanged.
        foreach (int t in new[] { 0, seqLen / 2, seqLen - 2 }.Where(t => t >= 0 && t < seqLen - 1))
        {
            Tensor? Perturb(Tensor? x)
            {
                if (x is null) return null;
                var y = x.clone();
                y[.., .., (t + 1)..] = randn(new long[] { batch, Heads, seqLen - t - 1, Dim }, dtype: ScalarType.Float64, generator: new Generator((ulong)t + 9)) * 5;
                return y;
            }
            var changed = module.forward(Perturb(q)!, Perturb(k), Perturb(v)!, keyMask).Output;
            TestSupport.AssertClose(result.Output[.., .., ..(t + 1)], changed[.., .., ..(t + 1)], $"outputs up to {t}");
        }
        Assert.Equal("lookBackward", Assert.ThrowsAny<ArgumentException>(() => new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal: false, lookBackward: true)).ParamName);
        Assert.Equal("lookBackward", Assert.ThrowsAny<ArgumentException>(() => new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal: true, numMemKv: 1, lookBackward: true)).ParamName);
    }

    private static RoutingAttention MakeHashed(bool causal, bool sharedQk, int memKv)
    {
        var module = new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal, sharedQk, memKv, seed: 5) { HashItems = true };
        module.to(ScalarType.Float64);
        return module;
    }

    [Theory]
    [InlineData(true, true, 16, false)]
    [InlineData(true, false, 13, true)]
    [InlineData(false, true, 13, true)]
    [InlineData(false, false, 16, false)]
    public void HashedClustersAreSimHashBucketsAndAttendAsTheOracle(bool causal, bool sharedQk, int seqLen, bool padded)
    {
        // hash_items: bit b of a token's cluster is 1 iff its normalised vector has a positive projection on direction b.
        const long batch = 2;
        var module = MakeHashed(causal, sharedQk, memKv: 0);
        module.train();
        var (q, k, v) = Inputs(77 + seqLen, batch, seqLen, sharedQk);
        var keyMask = PaddingMask(batch, seqLen, padded);
        var result = module.forward(q, k, v, keyMask);
        Assert.Equal(0.0, result.AuxLoss.item<double>());
        Assert.False(module.KMeans.HasPendingStatistics || module.KMeans.IsInitialized, "the k-means is not used");

        var directions = module.HashProjections();                                             // (H, bits, D)
        int bits = (int)directions.shape[1];
        Assert.Equal(module.Clusters, 1 << bits);
        TestSupport.AssertClose(eye(bits, dtype: ScalarType.Float64).expand(Heads, bits, bits), directions.matmul(directions.transpose(1, 2)), "orthonormal");
        var real = keyMask ?? ones(batch, seqLen, dtype: ScalarType.Bool);
        Tensor Bucket(Tensor x)
        {
            var weights = pow(2, arange(bits, dtype: ScalarType.Int64));                       // (bits)
            return (HashedProjections(module, x).gt(0).to(ScalarType.Int64) * weights).sum(-1)
                   .masked_fill(real.logical_not().unsqueeze(1), -1);                         // (B, H, T)
        }
        Tensor Similarities(Tensor x) => HashedSimilarities(module, x);
        var keySource = sharedQk ? q : k!;
        Tensor queryIdx, keyIdx;
        if (causal)
            (queryIdx, keyIdx, _) = RoutingAttention.CausalGroups(Bucket(q), Bucket(keySource), Window, module.Clusters);
        else
        {
            queryIdx = RoutingAttention.BalancedGroups(Similarities(q), keyMask, Window);
            keyIdx = RoutingAttention.BalancedGroups(Similarities(keySource), keyMask, Window);
        }
        AssertGroupsAndOracle(module, result, q, k, v, keyMask, queryIdx, keyIdx, causal, sharedQk, seed: 5);

        Assert.Equal("HashItems", Assert.ThrowsAny<ArgumentException>(() => new RoutingAttention(Heads, Dim, 12, 4) { HashItems = true }).ParamName);   // 3 clusters
        Assert.Equal("HashItems", Assert.ThrowsAny<ArgumentException>(() => new RoutingAttention(Heads, 2, 16, 2) { HashItems = true }).ParamName);    // 3 bits > D = 2
        if (!sharedQk) Assert.Equal("HashItems", Assert.ThrowsAny<ArgumentException>(() => module.CrossForward(q, q, v, null, null, 2)).ParamName);
    }

    /// <summary>The module chose <paramref name="queryIdx"/> / <paramref name="keyIdx"/>, and its output and the gradients
    /// of q, (k,) v equal the grouped oracle's on those groups.</summary>
    private static void AssertGroupsAndOracle(RoutingAttention module, RoutingAttentionOutput result, Tensor q, Tensor? k, Tensor v,
        Tensor? keyMask, Tensor queryIdx, Tensor keyIdx, bool causal, bool sharedQk, ulong seed)
    {
        Assert.Equal(queryIdx.data<long>().ToArray(), result.QueryIndices.data<long>().ToArray());
        Assert.Equal(keyIdx.data<long>().ToArray(), result.KeyIndices.data<long>().ToArray());
        var upstream = randn(result.Output.shape, dtype: ScalarType.Float64, generator: new Generator(seed));
        var inputs = sharedQk ? new[] { q, v } : new[] { q, k!, v };
        Tensor Module(Tensor[] x) => module.forward(x[0], sharedQk ? null : x[1], x[^1], keyMask).Output;
        Tensor Oracle(Tensor[] x) => GroupedOracle.Attention(x[0], sharedQk ? nn.functional.normalize(x[0], 2, -1) : x[1], x[^1],
            queryIdx, keyIdx, causal, sharedQk, keyMask);
        var expected = GroupedAttentionTests.Grad(Oracle, upstream, inputs);
        var actual = GroupedAttentionTests.Grad(Module, upstream, inputs);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        for (int n = 0; n < inputs.Length; n++) TestSupport.AssertClose(expected.Grads[n], actual.Grads[n], $"gradient {n}");
    }

    /// <summary>x̂·r_b for the hashing directions r_b of every head: (B, H, T, bits).</summary>
    private static Tensor HashedProjections(RoutingAttention module, Tensor x) =>
        einsum("bhtd,hkd->bhtk", nn.functional.normalize(x, 2, -1), module.HashProjections());

    /// <summary>Token–bucket similarities of hashed clusters: Σ_b ±(x̂·r_b), sign = bit b of the cluster; (B, H, T, C).</summary>
    private static Tensor HashedSimilarities(RoutingAttention module, Tensor x)
    {
        int bits = (int)module.HashProjections().shape[1];
        var signs = zeros(module.Clusters, bits, dtype: ScalarType.Float64);
        for (int c = 0; c < module.Clusters; c++)
            for (int b = 0; b < bits; b++) signs[c, b] = tensor(((c >> b) & 1) == 1 ? 1.0 : -1.0, dtype: ScalarType.Float64);
        return einsum("bhtk,ck->bhtc", HashedProjections(module, x), signs);
    }

    /// <summary>Strided groups by hand: per (batch, head, centroid), the real positions sorted by similarity (highest
    /// first), ranks 0, s, 2s, … with s = max(1, ⌊n / W⌋), W = min(window, T); ranks ≥ n are empty slots.</summary>
    [Theory]
    [InlineData(13, 4, true)]
    [InlineData(16, 4, false)]
    [InlineData(5, 8, true)]
    [InlineData(1, 3, false)]
    public void StridedGroupsTakeEveryStrideThRankOfTheRealTokens(int seqLen, int window, bool padded)
    {
        const int batch = 2, heads = 2, clusters = 3;
        var sims = randn(new long[] { batch, heads, seqLen, clusters }, dtype: ScalarType.Float64, generator: new Generator(41));
        var keyMask = padded ? PaddingMask(batch, seqLen, true) : null;
        var actual = RoutingAttention.StridedGroups(sims, keyMask, window);
        int w = Math.Min(window, seqLen);
        Assert.Equal(new long[] { batch, heads, clusters, w }, actual.shape);
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int c = 0; c < clusters; c++)
                {
                    var ranked = Enumerable.Range(0, seqLen).Where(t => keyMask is null || keyMask[b, t].item<bool>())
                        .OrderByDescending(t => sims[b, h, t, c].item<double>()).ToArray();
                    int stride = Math.Max(1, ranked.Length / w);
                    var expected = Enumerable.Range(0, w).Select(i => i * stride < ranked.Length ? (long)ranked[i * stride] : -1L).Order().ToArray();
                    Assert.Equal(expected, actual[b, h, c].data<long>().ToArray());
                }
    }

    /// <summary>StridedHeads = 1 of 2: head 0 groups by balanced top-W, head 1 by strided ranks (over the hashed
    /// similarities, which the test can compute), and the output and gradients are those of the grouped oracle.</summary>
    [Theory]
    [InlineData(true, 13)]
    [InlineData(false, 16)]
    public void StridedHeadsGroupByRankStridesAndAttendAsTheOracle(bool sharedQk, int seqLen)
    {
        const long batch = 2;
        var module = new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal: false, sharedQk, seed: 5) { HashItems = true, StridedHeads = 1 };
        module.to(ScalarType.Float64);
        var (q, k, v) = Inputs(91 + seqLen, batch, seqLen, sharedQk);
        var keyMask = PaddingMask(batch, seqLen, true);
        var result = module.forward(q, k, v, keyMask);
        Tensor Groups(Tensor x)
        {
            var sims = HashedSimilarities(module, x);                                          // (B, H, T, C)
            return cat([RoutingAttention.BalancedGroups(sims.narrow(1, 0, 1), keyMask, Window),
                        RoutingAttention.StridedGroups(sims.narrow(1, 1, 1), keyMask, Window)], 1);   // (B, H, C, W)
        }
        var queryIdx = Groups(q);
        var keyIdx = sharedQk ? queryIdx : Groups(k!);
        Assert.False(queryIdx[.., 1].equal(RoutingAttention.BalancedGroups(HashedSimilarities(module, q).narrow(1, 1, 1), keyMask, Window)[.., 0]).all().item<bool>(),
            "the strided head groups otherwise than top-W");
        AssertGroupsAndOracle(module, result, q, k, v, keyMask, queryIdx, keyIdx, causal: false, sharedQk, seed: 6);

        Assert.Equal("StridedHeads", Assert.ThrowsAny<ArgumentException>(() => new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal: true) { StridedHeads = 1 }).ParamName);
        Assert.Equal("StridedHeads", Assert.ThrowsAny<ArgumentException>(() => new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal: false) { StridedHeads = 3 }).ParamName);
    }

    public static TheoryData<bool, string> LeakCases()
    {
        var data = new TheoryData<bool, string>();
        foreach (bool sharedQk in new[] { false, true })
            foreach (var mode in new[] { "eval", "train", "train-initialising", "train-update-on-forward", "train-hashed" })
                data.Add(sharedQk, mode);
        return data;
    }

    [Theory]
    [MemberData(nameof(LeakCases))]
    public void CausalOutputsNeverDependOnLaterTokens(bool sharedQk, string mode)
    {
        const long batch = 2, seqLen = 14;
        RoutingAttention Build()
        {
            var module = mode == "train-hashed" ? MakeHashed(causal: true, sharedQk, memKv: 1) : Make(causal: true, sharedQk, memKv: 1, seed: 11);
            if (mode is not ("train-initialising" or "train-hashed")) WarmUp(module);
            if (mode == "eval") module.eval(); else module.train();
            module.KMeans.UpdateOnForward = mode == "train-update-on-forward";
            return module;
        }
        var (q, k, v) = Inputs(42, batch, seqLen, sharedQk);
        var keyMask = ones(batch, seqLen, dtype: ScalarType.Bool);
        keyMask[1, (int)(seqLen - 2)..] = tensor(false);
        foreach (int t in new[] { 0, 3, 8, 12 })
        {
            var gen = new Generator((ulong)t + 500);
            Tensor? Perturb(Tensor? x)
            {
                if (x is null) return null;
                var y = x.clone();
                y[.., .., (t + 1)..] = randn(new long[] { batch, Heads, seqLen - t - 1, Dim }, dtype: ScalarType.Float64, generator: gen) * 5;
                return y;
            }
            var first = Build();
            var second = Build();
            var before = first.forward(q, k, v, keyMask).Output;
            var after = second.forward(Perturb(q)!, Perturb(k), Perturb(v)!, keyMask).Output;
            TestSupport.AssertClose(before.narrow(2, 0, t + 1), after.narrow(2, 0, t + 1), $"outputs up to t = {t} ({mode})");
            Assert.False(allclose(before.narrow(2, t + 1, seqLen - t - 1), after.narrow(2, t + 1, seqLen - t - 1)), "later outputs do change");
            if (mode == "train-initialising")
            {
                // The initialisation did see the different futures; only later forwards route with it.
                Assert.True(first.KMeans.IsInitialized && second.KMeans.IsInitialized);
                Assert.False(allclose(first.KMeans.Means, second.KMeans.Means));
            }
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Float32ModuleMatchesOracle(bool causal)
    {
        var module = new RoutingAttention(Heads, Dim, MaxSeqLen, Window, causal, sharedQk: false, numMemKv: 1, seed: 4);
        var gen = new Generator(6);
        Tensor Make() => randn(new long[] { 2, Heads, 15, Dim }, generator: gen);
        var (q, k, v) = (Make(), Make(), Make());
        module.train();
        module.forward(q, k, v, null);                                                         // initialise
        var result = module.forward(q, k, v, null);
        var (memK, memV) = MemoryOf(module, result.GroupClusters);
        var expected = GroupedOracle.Attention(q, k, v, result.QueryIndices, result.KeyIndices, causal, false, memoryKeys: memK, memoryValues: memV);
        Assert.Equal(ScalarType.Float32, result.Output.dtype);
        TestSupport.AssertClose(expected, result.Output, "float32 output");
        CheckRouting(module, q, k, null, result);
    }

    [Fact]
    public void AuxLossIsTheCommitmentOfRealQueriesAndKeys()
    {
        var module = Make(causal: false, sharedQk: false, memKv: 0, commitment: 1.0);
        WarmUp(module);
        var (q, k, v) = Inputs(8, 2, 10, sharedQk: false);
        var keyMask = PaddingMask(2, 10, padded: true)!;
        var result = module.forward(q, k, v, keyMask);
        var x = nn.functional.normalize(cat([q, k!], 2), 2, -1);                              // (B, H, 2T, D)
        var means = module.KMeans.Means;
        var nearest = einsum("bhtd,hcd->bhtc", x, means).argmax(-1);                        // (B, H, 2T)
        double sum = 0; long count = 0;
        var real = cat([keyMask, keyMask], 1);
        for (int b = 0; b < 2; b++)
            for (int h = 0; h < Heads; h++)
                for (int t = 0; t < 20; t++)
                {
                    if (!real[b, t].item<bool>()) continue;
                    sum += (x[b, h, t] - means[h, nearest[b, h, t].item<long>()]).square().sum().item<double>();
                    count += Dim;
                }
        Assert.Equal(sum / count, result.AuxLoss.item<double>(), 12);
    }

    [Fact]
    public void StateDictRoundTripRestoresIdenticalOutputs()
    {
        var trained = Make(causal: true, sharedQk: true, memKv: 2, seed: 1);
        WarmUp(trained);
        Assert.Equal(new[] { "kmeans.initted", "kmeans.means", "mem_key", "mem_value" }, trained.state_dict().Keys.Order().ToArray());
        var stream = new MemoryStream();
        trained.save(stream);
        var restored = Make(causal: true, sharedQk: true, memKv: 2, seed: 2);
        restored.load(new MemoryStream(stream.ToArray()));
        Assert.True(restored.KMeans.IsInitialized);
        trained.eval(); restored.eval();
        var (q, _, v) = Inputs(3, 2, 11, sharedQk: true);
        var expected = trained.forward(q, null, v, null);
        var actual = restored.forward(q, null, v, null);
        TestSupport.AssertClose(expected.Output, actual.Output, "output", atol: 0, rtol: 0);
        Assert.True(expected.QueryIndices.eq(actual.QueryIndices).all().item<bool>());
    }

    [Fact]
    public void UpdateAllStepsEveryRoutingModuleOnce()
    {
        var module = Make(causal: false, sharedQk: true, memKv: 0);
        WarmUp(module);
        var before = module.KMeans.Means;
        var (q, _, v) = Inputs(4, 2, 12, sharedQk: true);
        module.forward(q, null, v, null);
        module.forward(q, null, v, null);
        TestSupport.AssertClose(before, module.KMeans.Means, "no update during forwards", atol: 0, rtol: 0);
        Assert.Equal(1, OnlineKMeans.UpdateAll(module));
        Assert.False(allclose(before, module.KMeans.Means));
        using (OnlineKMeans.SuspendUpdates(module))
        {
            module.forward(q, null, v, null);
            Assert.False(module.KMeans.HasPendingStatistics);
        }
    }

    [Fact]
    public void BadInputNamesTheArgument()
    {
        var shared = Make(causal: true, sharedQk: true, memKv: 0);
        var separate = Make(causal: false, sharedQk: false, memKv: 0);
        var x = zeros(new long[] { 1, Heads, 8, Dim }, dtype: ScalarType.Float64);
        string Param(Action a) => Assert.Throws<ArgumentException>(a).ParamName!;
        Assert.Equal("q", Param(() => shared.forward(zeros(new long[] { 1, Heads, MaxSeqLen + 1, Dim }, dtype: ScalarType.Float64), null, zeros(new long[] { 1, Heads, MaxSeqLen + 1, Dim }, dtype: ScalarType.Float64), null)));
        Assert.Equal("q", Param(() => shared.forward(zeros(new long[] { 1, Heads + 1, 8, Dim }, dtype: ScalarType.Float64), null, x, null)));
        Assert.Equal("q", Param(() => shared.forward(zeros(new long[] { 1, Heads, 8, Dim + 1 }, dtype: ScalarType.Float64), null, x, null)));
        Assert.Equal("k", Param(() => shared.forward(x, x, x, null)));
        Assert.Equal("k", Param(() => separate.forward(x, null, x, null)));
        Assert.Equal("k", Param(() => separate.forward(x, zeros(new long[] { 1, Heads, 7, Dim }, dtype: ScalarType.Float64), x, null)));
        Assert.Equal("v", Param(() => separate.forward(x, x, zeros(new long[] { 1, Heads, 7, Dim }, dtype: ScalarType.Float64), null)));
        Assert.Equal("keyMask", Param(() => separate.forward(x, x, x, ones(1, 7, dtype: ScalarType.Bool))));
        Assert.Equal("keyMask", Param(() => separate.forward(x, x, x, ones(1, 8))));
        Assert.Equal("windowSize", Param(() => new RoutingAttention(2, 4, 16, 0)));
        Assert.Equal("windowSize", Param(() => new RoutingAttention(2, 4, 16, -3)));
        Assert.Equal("windowSize", Param(() => new RoutingAttention(2, 4, 16, 17)));
        Assert.Equal("maxSeqLen", Param(() => new RoutingAttention(2, 4, 0, 4)));
        Assert.Equal("numMemKv", Param(() => new RoutingAttention(2, 4, 16, 4, numMemKv: -1)));
        Assert.Equal("heads", Param(() => new RoutingAttention(0, 4, 16, 4)));
        Assert.Equal("dimHead", Param(() => new RoutingAttention(2, 0, 16, 4)));
    }
}
