using static TorchSharp.torch;

namespace SparseAttention.Model;

public sealed partial class LshHeadGroup
{
    /// <summary>Causal LSH / ALSH heads decode per bucket chunk (see <see cref="Modules.LshAttention.CreateDecoder(long, ScalarType, Device, Func{Kernels.RelativePositionTerms?}?)"/>).</summary>
    public override bool SupportsDecoding => lsh.Causal;

    public override HeadGroupDecoder? CreateDecoder(long batch, int maxSeqLen, ScalarType dtype, Device device) =>
        lsh.CreateDecoder(batch, dtype, device, () => Relative);
}
