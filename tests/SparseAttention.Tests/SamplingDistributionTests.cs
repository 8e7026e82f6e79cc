using SparseAttention.Model;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// <see cref="Sampling.Generate"/> draws from the right distribution: many draws from fixed logits are compared with
/// softmax(logits / T) restricted to the top-k, then to the nucleus (top-p) of that tempered distribution, computed
/// here in plain double arithmetic (not through <see cref="Sampling.FilterLogits"/>).
/// </summary>
/// <remarks>
/// Mutations checked by hand (2026-12-02) by editing Generate and running this class; each fails it:
/// - ignore temperature and top-p (<c>FilterLogits(last, topK, null)</c> instead of <c>FilterLogits(last / temperature, topK, topP)</c>):
///   4 of 5 cases fail, e.g. 1445 draws of token 3 outside the T = 0.7, p = 0.9 nucleus, χ² = 7290 ≥ 30.3 for T = 0.5, k = 3;
/// - ignore temperature only (<c>FilterLogits(last, topK, topP)</c>): 4 of 5 fail (χ² 2405–7290 against bounds 30–35);
/// - ignore top-p only (<c>FilterLogits(last / temperature, topK, null)</c>): the 3 top-p cases draw tokens outside the nucleus;
/// - apply the temperature twice: 4 of 5 fail (χ² 904–3223).
/// The T = 1, no-filter case guards the plain softmax draw (multinomial on the right probabilities).
/// The expected nucleus is taken from the tempered distribution (Hugging Face's order: divide, then filter), as the
/// documentation of Generate says.
/// </remarks>
public sealed class SamplingDistributionTests
{
    private static readonly double[] Logits = [3.0, 2.2, 1.5, 1.0, 0.2, -0.5, -1.5, -3.0];
    private const int Draws = 20_000;

    /// <summary>softmax(logits / T) over the top-k, then over the smallest set of most probable tokens whose mass
    /// reaches top_p (a token is kept while the mass of the more probable tokens is below top_p).</summary>
    private static double[] Expected(double temperature, int? topK, double? topP)
    {
        int v = Logits.Length;
        var order = Enumerable.Range(0, v).OrderByDescending(i => Logits[i]).ToArray();   // distinct logits: no ties
        var kept = order.Take(topK ?? v).ToList();
        double Mass(int i, IEnumerable<int> set) => Math.Exp(Logits[i] / temperature) / set.Sum(j => Math.Exp(Logits[j] / temperature));
        if (topP is double p)
        {
            var nucleus = new List<int>();
            double before = 0;
            foreach (int i in kept)
            {
                if (before >= p) break;
                nucleus.Add(i);
                before += Mass(i, kept);
            }
            kept = nucleus;
        }
        var probs = new double[v];
        foreach (int i in kept) probs[i] = Mass(i, kept);
        return probs;
    }

    /// <summary>Upper 1e-6 quantile of χ² with <paramref name="df"/> degrees of freedom (Wilson–Hilferty): a correct
    /// sampler exceeds it once in a million seeds, a sampler off by a few percent in any category exceeds it for sure at 20 000 draws.</summary>
    internal static double ChiSquareBound(int df)
    {
        const double z = 4.753;                          // standard normal upper 1e-6 quantile
        double a = 2.0 / (9 * df);
        return df * Math.Pow(1 - a + z * Math.Sqrt(a), 3);
    }

    [Theory]
    [InlineData(1.0, null, null)]
    [InlineData(0.7, null, 0.9)]       // tempered nucleus {0, 1, 2}; untempered it would be {0, 1, 2, 3}
    [InlineData(1.5, 6, 0.9)]          // tempered nucleus {0, ..., 4} inside the top 6
    [InlineData(0.5, 3, null)]
    [InlineData(2.0, null, 0.6)]
    public void Generate_draws_from_softmax_of_tempered_logits_restricted_to_top_k_and_top_p(double temperature, int? topK, double? topP)
    {
        using var scope = NewDisposeScope();
        using var model = nn.Identity();
        var fixedLogits = tensor(Logits, dtype: ScalarType.Float32);                                     // (V)
        var prompt = zeros(Draws, 1, dtype: ScalarType.Int64);                                          // (B, 1): B independent draws
        var tokens = Sampling.Generate(model, prompt, maxNewTokens: 1, maxSeqLen: 4,
            w => fixedLogits.expand(w.shape[0], w.shape[1], Logits.Length),                            // (B, t, V)
            temperature: temperature, topK: topK, topP: topP, seed: 12345);
        Assert.Equal([(long)Draws, 1L], tokens.shape);

        var counts = new long[Logits.Length];
        foreach (long t in tokens.data<long>().ToArray()) counts[t]++;
        var expected = Expected(temperature, topK, topP);
        var outside = Enumerable.Range(0, Logits.Length).Where(i => expected[i] == 0 && counts[i] > 0).ToList();
        Assert.True(outside.Count == 0,
            $"drew tokens outside top-k/top-p: {string.Join(", ", outside.Select(i => $"{i} ×{counts[i]}"))}; counts [{string.Join(", ", counts)}]");
        var allowed = Enumerable.Range(0, Logits.Length).Where(i => expected[i] > 0).ToList();
        double chi2 = allowed.Sum(i => Math.Pow(counts[i] - Draws * expected[i], 2) / (Draws * expected[i]));
        double bound = ChiSquareBound(Math.Max(1, allowed.Count - 1));
        Assert.True(chi2 < bound,
            $"χ² = {chi2:F1} ≥ {bound:F1} (df {allowed.Count - 1}); counts [{string.Join(", ", counts)}], " +
            $"expected [{string.Join(", ", expected.Select(p => (p * Draws).ToString("F0")))}]");
    }

    [Fact]
    public void Expected_distribution_of_this_test_depends_on_temperature_and_top_p()
    {
        // Guards the test itself: with these logits, dropping the temperature or the top-p changes the target.
        var withAll = Expected(0.7, null, 0.9);
        Assert.Equal(3, withAll.Count(p => p > 0));
        Assert.Equal(4, Expected(1.0, null, 0.9).Count(p => p > 0));
        Assert.Equal(8, Expected(0.7, null, null).Count(p => p > 0));
        Assert.Equal(1.0, withAll.Sum(), 12);
        Assert.True(Math.Abs(Expected(1.5, null, null)[0] - Expected(1.0, null, null)[0]) > 0.05);
    }
}
