using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("SparseAttention.Tests")]
