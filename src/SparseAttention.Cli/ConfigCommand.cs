using System.CommandLine;
using System.Text;
using SparseAttention.Model;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn config show</c>: the effective model configuration of a preset with <c>--set</c> overrides, as JSON
/// (every key, defaults included; the output is itself a valid <c>--preset FILE</c>). <c>sparse-attn config list</c>:
/// the shipped presets as a Markdown table of their real settings (head groups per layer, sizes).
/// </summary>
internal static class ConfigCommand
{
    public static Command Create()
    {
        var presetOption = new Option<string>("--preset") { HelpName = "NAME|FILE", Description = $"Model preset: {string.Join(", ", Presets.Names)}, or a JSON file.", DefaultValueFactory = _ => "tiny" };
        var setOption = new Option<string[]>("--set") { HelpName = "KEY=VALUE", Description = "Override one configuration key (snake_case, e.g. --set dim=128); repeatable." };
        var show = new Command("show", "Print the effective configuration (preset + overrides, every key with its value) as JSON.") { presetOption, setOption };
        show.SetAction(parse =>
        {
            var config = Effective(parse.GetValue(presetOption)!, parse.GetValue(setOption) ?? []);
            parse.InvocationConfiguration.Output.WriteLine(ConfigBinding.ToJson(config));
            return CliApp.Ok;
        });
        var list = new Command("list", "Print the shipped presets as a Markdown table: head groups per layer, dim, depth, max_seq_len, window_size.");
        list.SetAction(parse =>
        {
            parse.InvocationConfiguration.Output.Write(PresetTable());
            return CliApp.Ok;
        });
        return new Command("config", "Show model configurations: a preset with overrides (show), the shipped presets (list).") { show, list };
    }

    /// <summary>Preset <paramref name="preset"/> (name or JSON file) with the <c>key=value</c> overrides applied, validated —
    /// what <c>train</c>, <c>bench --generate</c> and <c>config show</c> run. Errors name the option (<c>--preset</c>,
    /// <c>--set</c>, or a command option in <paramref name="optionOf"/>) or the configuration key.</summary>
    /// <param name="optionOf">Configuration properties a command sets from its own options (e.g. MaxSeqLen ← --seq-len),
    /// so an error blames the option the user gave.</param>
    internal static TransformerConfig Effective(string preset, IReadOnlyList<string> assignments,
        IReadOnlyDictionary<string, string>? optionOf = null)
    {
        var config = Presets.Load(preset);
        try { config = ConfigBinding.Apply(config, assignments, "set"); }
        catch (ArgumentException e) { throw new CliUsageException("--" + Plain(e)); }
        try { return config.Validate(); }
        catch (ArgumentException e) { throw new CliUsageException(DescribeConfigError(e, optionOf)); }
    }

    /// <summary>The message without .NET's "(Parameter 'x')" suffix.</summary>
    internal static string Plain(ArgumentException e) =>
        e.ParamName is null ? e.Message : e.Message.Replace($" (Parameter '{e.ParamName}')", "");

    /// <summary>"configuration: max_seq_len: must be ..." for a configuration key, "--seq-len: must be ..." for a property
    /// that <paramref name="optionOf"/> maps to a command option.</summary>
    internal static string DescribeConfigError(ArgumentException e, IReadOnlyDictionary<string, string>? optionOf = null)
    {
        string message = Plain(e);
        if (e.ParamName is null) return $"configuration: {message}";
        if (message.StartsWith(e.ParamName + ": ", StringComparison.Ordinal)) message = message[(e.ParamName.Length + 2)..];
        else if (message.StartsWith(e.ParamName + " ", StringComparison.Ordinal)) message = message[(e.ParamName.Length + 1)..];
        if (optionOf is not null && optionOf.TryGetValue(e.ParamName, out var option)) return $"{option}: {message}";
        return $"configuration: {ConfigBinding.KeyOf(e.ParamName)}: {message}";
    }

    /// <summary>The attention heads of every layer in words, e.g. "2 local + 2 routing heads"; layers that differ
    /// (sparsity_skip_first, a per-layer n_local_attn_heads) are listed by range: "layer 0: 4 local heads; layers 1–3: …".</summary>
    internal static string DescribeHeads(TransformerConfig config)
    {
        var perLayer = Enumerable.Range(0, config.Depth)
            .Select(layer => string.Join(" + ", config.HeadGroupsForLayer(layer).Select(g => $"{g.Heads} {KindName(g.Kind)}")) + " heads")
            .ToArray();
        if (perLayer.All(d => d == perLayer[0])) return perLayer[0];
        var parts = new List<string>();
        for (int start = 0; start < perLayer.Length;)
        {
            int end = start;
            while (end + 1 < perLayer.Length && perLayer[end + 1] == perLayer[start]) end++;
            parts.Add((start == end ? $"layer {start}" : $"layers {start}–{end}") + ": " + perLayer[start]);
            start = end + 1;
        }
        return string.Join("; ", parts);
    }

    /// <summary>The word for a head group kind in descriptions ("local", "routing", "LSH", ...).</summary>
    internal static string KindName(HeadGroupKind kind) => kind switch
    {
        HeadGroupKind.Lsh => "LSH",
        _ => kind.ToString().ToLowerInvariant(),
    };

    /// <summary>Column headers of <see cref="PresetTable"/>, in order.</summary>
    internal static readonly string[] TableColumns = ["Preset", "Attention heads per layer", "dim", "depth", "max_seq_len", "window_size"];

    /// <summary>The cells of one preset's table row, in <see cref="TableColumns"/> order.</summary>
    internal static string[] TableRow(string name, TransformerConfig config) =>
        [$"`{name}`", DescribeHeads(config), config.Dim.ToString(), config.Depth.ToString(), config.MaxSeqLen.ToString(), config.WindowSize.ToString()];

    /// <summary>Every shipped preset as a Markdown table (header, separator, one row per preset).</summary>
    internal static string PresetTable()
    {
        var text = new StringBuilder();
        text.Append("| ").AppendJoin(" | ", TableColumns).Append(" |\n");
        text.Append('|').AppendJoin("|", TableColumns.Select(_ => " --- ")).Append("|\n");
        foreach (var name in Presets.Names)
            text.Append("| ").AppendJoin(" | ", TableRow(name, Presets.Load(name).Validate())).Append(" |\n");
        return text.ToString();
    }
}
