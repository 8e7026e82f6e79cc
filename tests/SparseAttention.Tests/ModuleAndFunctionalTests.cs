using SparseAttention.Kernels;
using SparseAttention.Modules;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class ModuleAndFunctionalTests
{
    [Theory]
    [InlineData(1, 1, 1)]
    [InlineData(2, 13, 4)]
    [InlineData(3, 20, 2)]
    public void MultiHeadModuleEqualsProjectionsAroundTheOracle(int batch, int seqLen, int heads)
    {
        random.manual_seed(17);
        var pattern = AttentionPattern.HeadGroups(
            (new LocalBandPattern(3, causal: true), (heads + 1) / 2),
            (new FixedPattern(4, 1, 1, causal: true), heads / 2 == 0 ? 1 : heads / 2));
        int totalHeads = (heads + 1) / 2 + (heads / 2 == 0 ? 1 : heads / 2);
        var module = new SparseMultiHeadAttention(dim: 12, heads: totalHeads, pattern, dimHead: 5, blockSize: 8);
        module.to(ScalarType.Float64);
        var x = randn(new long[] { batch, seqLen, 12 }, dtype: ScalarType.Float64, generator: new Generator(3)).requires_grad_(true);
        var keyMask = ones(batch, seqLen, dtype: ScalarType.Bool);
        if (batch > 1) keyMask[1, 0] = tensor(false);

        var output = module.forward(x, keyMask);
        Assert.Equal(new long[] { batch, seqLen, 12 }, output.shape);

        // Independent computation from the module's own weights.
        var p = module.named_parameters().ToDictionary(n => n.name, n => n.parameter);
        Tensor Heads(Tensor t) => t.view(batch, seqLen, totalHeads, 5).permute(0, 2, 1, 3);     // (B, H, T, 5)
        var q = Heads(matmul(x, p["to_q.weight"].t()));
        var k = Heads(matmul(x, p["to_k.weight"].t()));
        var v = Heads(matmul(x, p["to_v.weight"].t()));
        var dense = pattern.Compile(seqLen, seqLen, totalHeads).ToDense().unsqueeze(0);
        var attended = ReferenceAttention.Attention(q, k, v, mask: dense, keyMask: keyMask);
        var expected = matmul(attended.permute(0, 2, 1, 3).reshape(batch, seqLen, totalHeads * 5), p["to_out.weight"].t()) + p["to_out.bias"];
        TestSupport.AssertClose(expected, output, "module output");

        var gradModule = autograd.grad([output.sum()], [x])[0];
        var gradExpected = autograd.grad([expected.sum()], [x])[0];
        TestSupport.AssertClose(gradExpected, gradModule, "dx");
    }

    [Fact]
    public void ModuleIsCausalWhenItsPatternIs()
    {
        random.manual_seed(1);
        var module = new SparseMultiHeadAttention(16, 4, new StridedPattern(4, causal: true, FactorizedCombine.MultiHead), blockSize: 4);
        var x = randn(2, 19, 16);
        var before = module.forward(x, null);
        var x2 = x.clone();
        x2[.., 10..] = randn(2, 9, 16) * 5;
        var after = module.forward(x2, null);
        TestSupport.AssertClose(before.narrow(1, 0, 10), after.narrow(1, 0, 10), "prefix", atol: 0, rtol: 0);
        Assert.False(torch.equal(before.narrow(1, 10, 9), after.narrow(1, 10, 9)).all().item<bool>());
    }

    [Fact]
    public void ModuleRejectsBadInput()
    {
        var module = new SparseMultiHeadAttention(16, 4, new DensePattern(true));
        Assert.Equal("x", Assert.Throws<ArgumentException>(() => module.forward(zeros(2, 5, 15), null)).ParamName);
        Assert.Equal("x", Assert.Throws<ArgumentException>(() => module.forward(zeros(new long[] { 2, 5, 16 }, dtype: ScalarType.Int32), null)).ParamName);
        Assert.Equal("heads", Assert.Throws<ArgumentException>(() => new SparseMultiHeadAttention(10, 4, new DensePattern(true))).ParamName);
        Assert.Equal("heads", Assert.Throws<ArgumentException>(() =>
            new SparseMultiHeadAttention(16, 4, AttentionPattern.HeadGroups((new DensePattern(true), 3))).forward(zeros(1, 4, 16), null)).ParamName);
    }

    /// <summary>OpenAI's get_attn_mask written with tensor ops: all = tril, local = band, strided = tril ∧ (i−j) mod c = 0.</summary>
    private static Tensor OpenAiMask(AttnMode mode, int n, int ctx)
    {
        var i = arange(n).unsqueeze(1); var j = arange(n).unsqueeze(0);
        var tril = ones(n, n, dtype: ScalarType.Bool).tril();
        return mode switch
        {
            AttnMode.All => tril,
            AttnMode.Local => tril.logical_and(ones(n, n, dtype: ScalarType.Bool).triu(-(ctx - 1))),
            AttnMode.Strided => tril.logical_and((i - j).remainder(ctx).eq(0)),
            _ => throw new ArgumentException(),
        };
    }

    [Theory]
    [InlineData(AttnMode.All, 0)]
    [InlineData(AttnMode.Local, 5)]
    [InlineData(AttnMode.Strided, 4)]
    public void OpenAiFunctionsMatchTheirMaskDefinition(AttnMode mode, int ctx)
    {
        const int batch = 2, n = 23, heads = 3, embed = 12;
        var gen = new Generator(8);
        var q = randn(new long[] { batch, n, embed }, dtype: ScalarType.Float64, generator: gen);
        var k = randn(new long[] { batch, n, embed }, dtype: ScalarType.Float64, generator: gen);
        var v = randn(new long[] { batch, n, embed }, dtype: ScalarType.Float64, generator: gen);
        Tensor Split(Tensor t) => t.view(batch, n, heads, embed / heads).transpose(1, 2);
        var expected = ReferenceAttention.Attention(Split(q), Split(k), Split(v), mask: OpenAiMask(mode, n, ctx))
                       .transpose(1, 2).reshape(batch, n, embed);
        TestSupport.AssertClose(expected, OpenAiSparseAttention.AttentionImpl(q, k, v, heads, mode, ctx), "attention_impl");
        TestSupport.AssertClose(expected, OpenAiSparseAttention.BlocksparseAttentionImpl(q, k, v, heads, mode, ctx, blocksize: 8), "blocksparse_attention_impl");
    }

    [Fact]
    public void OpenAiFixedModeUsesSummaryCellsPerHead()
    {
        const int n = 24, heads = 2, embed = 8;
        var gen = new Generator(2);
        var q = randn(new long[] { 1, n, embed }, dtype: ScalarType.Float64, generator: gen);
        var k = randn(new long[] { 1, n, embed }, dtype: ScalarType.Float64, generator: gen);
        var v = randn(new long[] { 1, n, embed }, dtype: ScalarType.Float64, generator: gen);
        // stride 6, vertsize 2, num_verts 2: head 0 summary = last 2 of each block, head 1 = the 2 before those.
        var i = arange(n).unsqueeze(1); var j = arange(n).unsqueeze(0);
        var sameBlock = i.div(6, rounding_mode: RoundingMode.floor).eq(j.div(6, rounding_mode: RoundingMode.floor));
        var causal = i.ge(j);
        var head0 = sameBlock.logical_or(j.remainder(6).ge(4)).logical_and(causal);
        var head1 = sameBlock.logical_or(j.remainder(6).ge(2).logical_and(j.remainder(6).lt(4))).logical_and(causal);
        var mask = stack([head0, head1]).unsqueeze(0);                                  // (1, 2, n, n)
        Tensor Split(Tensor t) => t.view(1, n, heads, embed / heads).transpose(1, 2);
        var expected = ReferenceAttention.Attention(Split(q), Split(k), Split(v), mask: mask).transpose(1, 2).reshape(1, n, embed);
        TestSupport.AssertClose(expected, OpenAiSparseAttention.BlocksparseAttentionImpl(q, k, v, heads, AttnMode.Fixed, 6, blocksize: 4, numVerts: 2, vertsize: 2), "fixed");
        Assert.Equal("attnMode", Assert.Throws<ArgumentException>(() => OpenAiSparseAttention.AttentionImpl(q, k, v, heads, AttnMode.Fixed, 6)).ParamName);
        Assert.Equal("heads", Assert.Throws<ArgumentException>(() => OpenAiSparseAttention.AttentionImpl(q, k, v, 3, AttnMode.All)).ParamName);
        Assert.Equal("localAttnCtx", Assert.Throws<ArgumentException>(() => OpenAiSparseAttention.AttentionImpl(q, k, v, 2, AttnMode.Local, 0)).ParamName);
    }
}
