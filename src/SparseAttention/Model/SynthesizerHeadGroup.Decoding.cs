using static TorchSharp.torch;

namespace SparseAttention.Model;

public sealed partial class SynthesizerHeadGroup
{
    /// <summary>Causal synthesizer heads decode from their position-indexed rows (see <see cref="Modules.SynthesizerAttention.CreateDecoder"/>).</summary>
    public override bool SupportsDecoding => synthesizer.Causal;

    public override HeadGroupDecoder? CreateDecoder(long batch, int maxSeqLen, ScalarType dtype, Device device) =>
        synthesizer.CreateDecoder(batch, dtype, device);
}
