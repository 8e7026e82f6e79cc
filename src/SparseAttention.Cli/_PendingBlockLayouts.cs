// TEMPORARY — DELETE AT MERGE.
// Stand-ins for the block-layout patterns being written in src/SparseAttention/Patterns/BlockLayouts.cs,
// with exactly the agreed constructor signatures, so the CLI compiles before that file lands. Every
// constructor throws. Once the real classes are in the library this file makes the build fail on
// purpose (CS0436 is an error in this project; the tests get CS0433): delete it.
#pragma warning disable CS9113 // the stand-ins never read their parameters
namespace SparseAttention.Patterns;

public abstract class BlockLayoutPattern : AttentionPattern
{
    private protected BlockLayoutPattern(string name) : base(name) =>
        throw new NotImplementedException($"{name} is not in the library yet (src/SparseAttention/Patterns/BlockLayouts.cs has not been merged).");

    public override bool IsCausal => throw new NotImplementedException();
    public override bool Allows(int head, int query, int key, int seqLen) => throw new NotImplementedException();
}

public sealed class DsFixedPattern(int block, bool causal, int numLocalBlocks = 4, int numGlobalBlocks = 1,
    bool horizontalGlobalAttention = false, int numDifferentGlobalPatterns = 1, bool differentLayoutPerHead = false)
    : BlockLayoutPattern("ds-fixed");

public sealed class DsVariablePattern(int block, bool causal, int numRandomBlocks = 0, int[]? localWindowBlocks = null,
    int[]? globalBlockIndices = null, int[]? globalBlockEndIndices = null, bool horizontalGlobalAttention = false,
    bool differentLayoutPerHead = false, int seed = 0)
    : BlockLayoutPattern("ds-variable");

public sealed class BigBirdPattern(int block, bool causal, int numRandomBlocks = 1, int numSlidingWindowBlocks = 3,
    int numGlobalBlocks = 1, bool differentLayoutPerHead = false, int seed = 0)
    : BlockLayoutPattern("bigbird");

public sealed class LongformerPattern(int block, bool causal, int numSlidingWindowBlocks = 3, int[]? globalBlockIndices = null,
    int[]? globalBlockEndIndices = null, bool differentLayoutPerHead = false)
    : BlockLayoutPattern("longformer");

public sealed class SlidingWindowPattern(int block, bool causal, int numSlidingWindowBlocks = 3)
    : BlockLayoutPattern("sliding-window");
