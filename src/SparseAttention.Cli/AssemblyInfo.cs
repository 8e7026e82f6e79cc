using System.Runtime.CompilerServices;

// Tests reach the commands' internal helpers (window arithmetic, attention masks, the stdin override).
[assembly: InternalsVisibleTo("SparseAttention.Tests")]
