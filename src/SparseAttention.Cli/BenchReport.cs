using System.Text.Json;
using SparseAttention.Training;
using Spectre.Console;

namespace SparseAttention.Cli;

/// <summary>What <c>sparse-attn bench</c> reports: the kernel and model tables on standard output, the run's environment
/// (huge pages, MKL dispatch, OpenMP waiting) on standard error, and optionally everything as JSON.</summary>
internal static class BenchReport
{
    /// <summary>Prints the tables of the rows given (null = not run), the environment line, and writes the JSON file when asked.</summary>
    public static void Write(TextWriter stdout, TextWriter stderr, BenchLimits limits, List<KernelBench.Result>? results,
        List<ModelBench.ModelResult>? modelResults, string modelConfig, long hugePagesBytes, string? jsonPath)
    {
        if (results is not null) Print(stdout, results, limits.ToString());
        if (modelResults is not null) PrintModel(stdout, modelResults, limits.ToString(), modelConfig);
        // Whether libtorch's large tensors were on transparent huge pages (the CLI asks for them unless the user set the variable):
        // the most AnonHugePages seen while the kernel rows' inputs were resident.
        string hugePages = TorchAllocator.NativeVariable(TorchAllocator.HugePagesVariable) ?? "unset";
        double hugePagesMb = Math.Round(hugePagesBytes / 1048576.0, 1);
        // Which MKL kernels the GEMM rows (ours and dense attention's) ran on: see MklDispatch.
        string mklDispatch = MklDispatch.Status?.ToString() ?? "not requested";
        string waitPolicy = TorchAllocator.NativeVariable(TorchThreads.WaitPolicyVariable) ?? "unset";
        string spinCount = TorchAllocator.NativeVariable(TorchThreads.SpinCountVariable) ?? "unset";
        stderr.WriteLine($"bench: {TorchAllocator.HugePagesVariable}={hugePages}; AnonHugePages up to {hugePagesMb:F0} MB; MKL dispatch by CPU features: {mklDispatch}; {TorchThreads.WaitPolicyVariable}={waitPolicy}; {TorchThreads.SpinCountVariable}={spinCount}; freed memory retained: {(TorchAllocator.FreedMemoryRetained ? "yes" : "no")}");
        if (jsonPath is not null)
        {
            var document = new Dictionary<string, object?>
            {
                ["threads"] = limits.Threads, ["gemm_gflops"] = Math.Round(limits.Gemm, 2), ["bf16_gemm_gflops"] = Math.Round(limits.Bf16, 2),
                ["fma_peak_gflops"] = Math.Round(limits.Peak, 2), ["fma_vector_bits"] = limits.VectorBits,
                ["thp_mem_alloc_enable"] = hugePages, ["anon_huge_pages_mb"] = hugePagesMb, ["mkl_dispatch_by_features"] = mklDispatch, ["omp_wait_policy"] = waitPolicy, ["gomp_spincount"] = spinCount, ["retain_freed_memory"] = TorchAllocator.FreedMemoryRetained,
                ["results"] = results ?? [],
            };
            if (modelResults is not null) document["model_results"] = modelResults;
            AtomicFile.WriteAllText(jsonPath, JsonSerializer.Serialize(document, new JsonSerializerOptions { WriteIndented = true }));
            stderr.WriteLine($"bench: wrote {jsonPath}");
        }
    }

    private static void Print(TextWriter stdout, List<KernelBench.Result> results, string limits)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(stdout), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        console.Profile.Width = 140;
        var table = new Table().Title($"attention bench — {limits}");
        foreach (var c in new[] { "attention", "impl", "pass", "T", "ms", "GFLOP/s", "% of GEMM", "% of peak", "× dense", "peak RSS MB" }) table.AddColumn(c);
        foreach (var r in results)
            table.AddRow(r.attention, r.impl, r.pass, r.seq_len.ToString(), r.ms.ToString("F1"), r.gflops.ToString("F1"),
                (r.efficiency * 100).ToString("F0"), (r.peak_efficiency * 100).ToString("F0"), r.speedup_vs_dense is double s ? s.ToString("F1") : "–",
                r.peak_rss_mb.ToString("F0"));
        console.Write(table);
    }

    private static void PrintModel(TextWriter stdout, List<ModelBench.ModelResult> results, string limits, string config)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(stdout), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        console.Profile.Width = 140;
        var table = new Table().Title($"model training step — {limits}");
        foreach (var c in new[] { "model", "T", "B", "dim", "heads", "depth", "ms/step", "tokens/s", "× dense", "peak RSS MB" }) table.AddColumn(c);
        foreach (var r in results)
            table.AddRow(r.model, r.seq_len.ToString(), r.batch.ToString(), r.dim.ToString(), r.heads.ToString(), r.depth.ToString(),
                r.ms_per_step.ToString("F1"), r.tokens_per_s.ToString("F0"), r.speedup_vs_dense is double s ? s.ToString("F2") : "–", r.peak_rss_mb.ToString("F0"));
        console.Write(table);
        stdout.WriteLine("model: " + config);
    }
}
