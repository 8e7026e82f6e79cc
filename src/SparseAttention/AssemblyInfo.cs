using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("SparseAttention.Tests")]
// The CLI's bench measures the machine's FMA peak with the kernels' own vector width and multiply-add (FmaProbe).
[assembly: InternalsVisibleTo("sparse-attn")]
