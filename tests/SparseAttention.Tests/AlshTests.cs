using SparseAttention.Hashing;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class AlshTests
{
    /// <summary>Keys with widely varying norms (MIPS is only interesting then) and queries, (1, 1, N, D) float64.</summary>
    private static (Tensor Keys, Tensor Queries) Data(int keys, int queries, int dim, long seed)
    {
        var gen = new Generator((ulong)seed);
        var k = randn(new long[] { 1, 1, keys, dim }, dtype: ScalarType.Float64, generator: gen)
                * (randn(new long[] { 1, 1, keys, 1 }, dtype: ScalarType.Float64, generator: gen) * 0.5).exp();
        var q = randn(new long[] { 1, 1, queries, dim }, dtype: ScalarType.Float64, generator: gen);
        return (k, q);
    }

    private static Tensor Cosine(Tensor a, Tensor b) =>
        matmul(a / a.norm(-1, keepdim: true), (b / b.norm(-1, keepdim: true)).transpose(-1, -2));     // (1, 1, Na, Nb)

    [Theory]
    [InlineData(AlshTransform.SimpleLsh)]
    [InlineData(AlshTransform.Xbox)]
    [InlineData(AlshTransform.SignAlsh)]
    public void TransformedInnerProductIsProportionalToTheOriginal(AlshTransform transform)
    {
        var (k, q) = Data(100, 10, 8, 1);
        var (p, qq) = MipsTransforms.Apply(k, q, transform);
        Assert.Equal(8 + MipsTransforms.ExtraDims(transform), p.shape[3]);
        var original = matmul(q, k.transpose(-1, -2));                                   // (1, 1, 10, 100)
        var transformed = matmul(qq, p.transpose(-1, -2));
        var ratio = transformed / original;                                               // one positive constant per query
        Assert.True(ratio.gt(0).all().item<bool>());
        TestSupport.AssertClose(ratio.narrow(-1, 0, 1).expand_as(ratio), ratio, "P(x)·Q(q) / (q·x) per query");
    }

    [Theory]
    [InlineData(AlshTransform.SimpleLsh)]
    [InlineData(AlshTransform.Xbox)]
    public void ConstantNormTransformsOrderKeysByInnerProductExactly(AlshTransform transform)
    {
        var (k, q) = Data(100, 10, 8, 2);
        var (p, qq) = MipsTransforms.Apply(k, q, transform);
        var norms = p.norm(-1);
        TestSupport.AssertClose(norms.narrow(-1, 0, 1).expand_as(norms), norms, "all key rows share one norm");
        var byInnerProduct = matmul(q, k.transpose(-1, -2)).argsort(-1);
        var byCosine = Cosine(qq, p).argsort(-1);
        Assert.True(byInnerProduct.equal(byCosine).all().item<bool>(), "angle order = inner-product order");
        // QNF: query rows get the key rows' norm, so the Euclidean distance also orders by inner product.
        var (pn, qn) = MipsTransforms.Apply(k, q, transform, queryNormalizedFirst: true);
        TestSupport.AssertClose(pn.norm(-1).max().expand(10), qn.norm(-1).view(10), "QNF query norm = key norm");
        var distance = cdist(qn.squeeze(0), pn.squeeze(0)).unsqueeze(0);               // (1, 1, 10, 100)
        Assert.True(byInnerProduct.equal(distance.neg().argsort(-1)).all().item<bool>(), "distance order = inner-product order");
    }

    [Fact]
    public void SignAlshOrdersKeysByInnerProductUpToTheVanishingNormTerm()
    {
        const double u = MipsTransforms.SignAlshU;
        var (k, q) = Data(200, 10, 8, 3);
        var (p, qq) = MipsTransforms.Apply(k, q, AlshTransform.SignAlsh);
        // ‖P(x)‖² = m/4 + ‖x̃‖^(2^(m+1)) with m = 2 and ‖x̃‖ ≤ U (Shrivastava & Li 2015, the telescoping identity).
        var scaledNorm = p.narrow(-1, 0, 8).norm(-1);
        TestSupport.AssertClose(0.5 + scaledNorm.pow(8), p.square().sum(-1), "‖P(x)‖² identity");
        Assert.True(scaledNorm.max().item<double>() <= u + 1e-12);
        // Whenever ip1 exceeds ip2 by the norm factor √((m/4 + U⁸)/(m/4)), the angle must prefer key 1.
        var ip = matmul(qq, p.transpose(-1, -2)).squeeze(0).squeeze(0);                    // (10, 200), Q has unit norm
        var cos = Cosine(qq, p).squeeze(0).squeeze(0);
        double factor = Math.Sqrt((0.5 + Math.Pow(u, 8)) / 0.5);
        var ip1 = ip.unsqueeze(-1); var ip2 = ip.unsqueeze(-2);
        var guaranteed = ip1.gt(0).logical_and(ip1.gt(ip2.clamp_min(0) * factor));       // (10, 200, 200)
        Assert.True(guaranteed.sum().item<long>() > 10000, "the guarantee should cover many pairs");
        var preferred = cos.unsqueeze(-1).gt(cos.unsqueeze(-2));
        Assert.True(preferred.logical_or(guaranteed.logical_not()).all().item<bool>(), "angle order agrees where guaranteed");
        // Overall concordance of angle and inner-product orders is high.
        var concordant = ip1.gt(ip2).eq(cos.unsqueeze(-1).gt(cos.unsqueeze(-2))).to(ScalarType.Float64).mean().item<double>();
        Assert.True(concordant > 0.95, $"concordance {concordant:F3}");
    }

    [Theory]
    [InlineData(AlshTransform.SimpleLsh, false)]
    [InlineData(AlshTransform.SimpleLsh, true)]
    [InlineData(AlshTransform.Xbox, false)]
    [InlineData(AlshTransform.Xbox, true)]
    [InlineData(AlshTransform.SignAlsh, false)]
    [InlineData(AlshTransform.SignAlsh, true)]
    public void MipsRecallBeatsRandomBucketing(AlshTransform transform, bool qnf)
    {
        const int keys = 512, queries = 256, dim = 8, bits = 5, rounds = 4;
        var (k, q) = Data(keys, queries, dim, 4);
        var (p, qq) = MipsTransforms.Apply(k, q, transform, qnf);
        var planes = SignRandomProjection.Planes(1, rounds, dim + MipsTransforms.ExtraDims(transform), bits, new Generator(9));
        var keyBuckets = SignRandomProjection.Buckets(p, planes)[0, 0];                   // (R, N)
        var queryBuckets = SignRandomProjection.Buckets(qq, planes)[0, 0];                // (R, Nq) from the query's own Q(q)
        var collide = queryBuckets.unsqueeze(-1).eq(keyBuckets.unsqueeze(-2)).any(0);     // (Nq, N): same bucket in some round
        var best = matmul(q, k.transpose(-1, -2))[0, 0].argmax(-1);                       // (Nq) the true MIPS key
        double recall = collide.gather(1, best.unsqueeze(-1)).to(ScalarType.Float64).mean().item<double>();
        // Random bucketing with the same bucket sizes: the chance that a random key shares a bucket with the query.
        double chance = collide.to(ScalarType.Float64).mean().item<double>();
        Assert.True(recall > chance + 0.2 && recall > 2.5 * chance, $"recall {recall:F3} vs random bucketing {chance:F3}");
        if (qnf)
        {
            var (_, plain) = MipsTransforms.Apply(k, q, transform, false);
            Assert.True(SignRandomProjection.Buckets(plain, planes).equal(SignRandomProjection.Buckets(qq, planes)).all().item<bool>(),
                "sign hashes ignore length, so QNF's rescaling never changes a bucket");
        }
    }

    [Fact]
    public void BadArgumentsAreRejected()
    {
        var (k, q) = Data(10, 4, 8, 5);
        Assert.Throws<ArgumentException>(() => MipsTransforms.Apply(k, q.narrow(-1, 0, 4), AlshTransform.Xbox));
        Assert.Throws<ArgumentException>(() => MipsTransforms.Apply(k, q, (AlshTransform)17));
        Assert.Throws<ArgumentException>(() => SignRandomProjection.Planes(1, 1, 8, 0, new Generator(1)));
        Assert.Throws<ArgumentException>(() => AngularLsh.Rotations(1, 1, 8, 3, new Generator(1)));
    }
}
