using System.CommandLine;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>The <c>--device cpu|cuda[:N]</c> option of <c>train</c>, <c>sample</c>, <c>eval</c> and <c>bench</c>.</summary>
internal static partial class CliDevice
{
    public static Option<string> CreateOption() => new("--device")
    {
        HelpName = "cpu|cuda[:N]",
        Description = "Where the model and its tensors live: cpu (default), or a CUDA device when libtorch has one (the fused C# kernels are CPU-only; on a GPU the TorchSharp-ops kernels run).",
        DefaultValueFactory = _ => "cpu",
    };

    /// <summary>The device <paramref name="value"/> names; a clear usage error when it is malformed or not present.</summary>
    public static Device Parse(string value)
    {
        var match = DeviceName().Match(value ?? "");
        if (!match.Success) throw new CliUsageException($"--device: expected cpu, cuda or cuda:N, got '{value}'.");
        if (match.Groups["kind"].Value == "cpu") return CPU;
        if (!cuda.is_available())
            throw new CliUsageException($"--device {value}: CUDA is not available in this process (no CUDA device, or a CPU-only libtorch such as "
                                        + "the TorchSharp-cpu package this tool ships); use --device cpu.");
        int index = match.Groups["index"].Success ? int.Parse(match.Groups["index"].Value) : 0;
        int count = cuda.device_count();
        if (index >= count) throw new CliUsageException($"--device {value}: there are {count} CUDA devices (cuda:0 … cuda:{count - 1}).");
        return new Device(DeviceType.CUDA, index);
    }

    [GeneratedRegex(@"^(?<kind>cpu|cuda)(:(?<index>\d{1,3}))?$")]
    private static partial Regex DeviceName();
}
