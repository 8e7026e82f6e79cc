using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// The model tests run many tiny tensor ops. On a busy machine libtorch's intra-op thread pool makes
/// each of them wait for its workers (measured here: a 40-token generation took 0.3–9 s with the
/// default pool and 0.05–0.3 s with one thread), so each model test runs with one intra-op thread and
/// restores the previous setting afterwards. Results do not depend on it beyond summation order.
/// </summary>
public partial class ModelTests : IDisposable
{
    private readonly int previousThreads;

    public ModelTests()
    {
        previousThreads = get_num_threads();
        set_num_threads(1);
    }

    public void Dispose()
    {
        set_num_threads(previousThreads);
        GC.SuppressFinalize(this);
    }
}
